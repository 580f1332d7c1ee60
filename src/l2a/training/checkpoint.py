"""Checkpoints that resume exactly and whose model part loads with `from_pretrained`.

Layout of `output_dir/checkpoints/step-000100/`:
- `config.json`, `model*.safetensors` (+ tokenizer files): written by `save_pretrained`, so
  `AutoModelForCausalLM.from_pretrained(checkpoint_dir)` (or `L2AForCausalLM`) loads the trained model;
- `trainer_state.pt`: step, optimizer and scheduler state dicts, counters;
- `rank_00000.pt` ...: per-rank RNG states (python, numpy, torch, CUDA) and data position;
- `train_config.yaml`: the `TrainConfig` of the run.

A checkpoint is written into `.step-000100.tmp` and renamed when complete, so a crash never leaves a
half-written `step-*` directory and never touches an existing one; after the rename, checkpoints beyond
`keep_last` are deleted (oldest first).

Resuming checks a checkpoint's files first (`check_checkpoint`: headers and archive directories, no tensor
data read) and names the unreadable file. With `resume: auto` an unreadable newest checkpoint is moved
aside to `step-000100.corrupt` with a warning and the run resumes from the newest readable one.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import struct
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

_STEP_DIR = re.compile(r"^step-(\d+)$")


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing or cannot be read; the message names the file."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy, torch (CPU) and the current CUDA device."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@contextlib.contextmanager
def _quiet_hf_progress() -> Iterator[None]:
    """Hide transformers' per-save progress bars (they would break the training bar's line)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    root: str | Path,
    step: int,
    *,
    model: Any,
    model_state: dict[str, torch.Tensor] | None,
    trainer_state: dict[str, Any],
    rank_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
    tokenizer: Any = None,
) -> Path:
    """Write checkpoint `step` under `root` (collective: call on every rank).

    model: the unwrapped HF model (its `save_pretrained` writes config and weights on rank 0).
    model_state: full state dict to save on rank 0 (needed when the live parameters are sharded);
        None saves the model's own parameters.
    trainer_state: rank-0 state (step, optimizer, scheduler, ...); rank_state: this rank's RNG/data state.
    Returns the final checkpoint directory.
    """
    root = Path(root)
    name = checkpoint_name(step)
    final = root / name
    tmp = root / f".{name}.tmp"
    rank = _rank()
    if rank == 0:
        if final.exists():
            raise FileExistsError(f"checkpoint {final} already exists; refusing to overwrite it")
        if tmp.exists():
            shutil.rmtree(tmp)  # left by an interrupted save
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    if rank == 0:
        with _quiet_hf_progress():
            model.save_pretrained(tmp, state_dict=model_state)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        torch.save(trainer_state, tmp / "trainer_state.pt")
        (tmp / "train_config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    _barrier()
    if rank == 0:
        tmp.rename(final)
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    _barrier()
    return final


def _check_safetensors(file: Path) -> None:
    """The header parses and the data it describes fits the file (catches truncation and garbage)."""
    size = file.stat().st_size
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise CorruptCheckpointError(f"checkpoint file {file} is truncated ({size} bytes)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CorruptCheckpointError(f"checkpoint file {file} is truncated or not a safetensors file")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CorruptCheckpointError(f"checkpoint file {file} has an unreadable header") from None
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if 8 + header_len + max(ends, default=0) > size:
        raise CorruptCheckpointError(f"checkpoint file {file} is truncated ({size} bytes)")


def _check_torch_archive(file: Path) -> None:
    """A `torch.save` file is a zip archive whose central directory (at its end) must be readable."""
    try:
        with zipfile.ZipFile(file) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise CorruptCheckpointError(f"checkpoint file {file} is unreadable ({error})") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            return [path / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CorruptCheckpointError(f"checkpoint file {index} is unreadable") from None
    if (path / "model.safetensors").exists():
        return [path / "model.safetensors"]
    raise CorruptCheckpointError(f"no model.safetensors (or index) in checkpoint {path}")


def check_checkpoint(path: str | Path) -> None:
    """Raise `CorruptCheckpointError` naming the first missing or unreadable file of checkpoint `path`.

    Reads the JSON/YAML files, the safetensors headers and the zip directories of the `torch.save` files
    (not the tensor data), which catches missing, empty, truncated and overwritten files.
    """
    path = Path(path)
    if not path.is_dir():
        raise CorruptCheckpointError(f"checkpoint {path} is not a directory")
    for name in ("config.json", "trainer_state.pt", "rank_00000.pt"):
        if not (path / name).is_file():
            raise CorruptCheckpointError(f"checkpoint {path} has no {name}")
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CorruptCheckpointError(f"checkpoint file {path / 'config.json'} is not valid JSON") from None
    for file in _weight_files(path):
        if not file.is_file():
            raise CorruptCheckpointError(f"checkpoint {path} has no {file.name}")
        _check_safetensors(file)
    for file in [path / "trainer_state.pt", *sorted(path.glob("rank_*.pt"))]:
        _check_torch_archive(file)


def latest_good_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root` that passes `check_checkpoint` (None when there is none).

    Newer unreadable ones are moved aside to `step-N.corrupt` (by rank 0) with a warning naming the file,
    so the resumed run can write its own `step-N` again. Raises `CorruptCheckpointError` when there are
    checkpoints but none is readable.
    """
    found = list_checkpoints(root)
    problems: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            check_checkpoint(path)
        except CorruptCheckpointError as error:
            problems.append((path, str(error)))
            continue
        if _rank() == 0:
            for bad, reason in problems:
                aside = _aside_name(bad)
                bad.rename(aside)
                warnings.warn(
                    f"{reason}; moved it aside to {aside.name} and resuming from {path.name}", stacklevel=2
                )
        return path
    if problems:
        raise CorruptCheckpointError(
            "no readable checkpoint to resume from: " + "; ".join(reason for _, reason in problems)
        )
    return None


def _aside_name(path: Path) -> Path:
    aside, n = path.with_name(f"{path.name}.corrupt"), 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.corrupt{n}"), n + 1
    return aside


def _load(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"checkpoint file {file} is missing") from None
    except Exception as error:  # pickle/zip/torch errors alike: the file is what the user must know
        raise CorruptCheckpointError(f"checkpoint file {file} is unreadable ({error})") from None


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    return _load(Path(path) / "trainer_state.pt")


def load_rank_state(path: str | Path, rank: int) -> dict[str, Any]:
    file = Path(path) / f"rank_{rank:05d}.pt"
    if not file.exists():
        raise FileNotFoundError(
            f"{file} missing: checkpoint {path} was written by fewer ranks; resume with the same world size"
        )
    return _load(file)


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors written by `save_pretrained` in `path` (single or sharded safetensors), on CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(Path(path)):
        try:
            state.update(load_file(str(file), device="cpu"))
        except (SafetensorError, OSError) as error:
            raise CorruptCheckpointError(f"checkpoint file {file} is unreadable ({error})") from None
    return state
