"""What every `l2a` command shares: one way to report a user's mistake, and the checks made before any work.

A mistake is reported as one line, `l2a <command>: error: ...`, with exit code 2 and no traceback
(`L2A_DEBUG=1` re-raises, for a traceback); Ctrl-C prints `l2a <command>: interrupted` and exits with 130.
Warnings raised by l2a's own code print as `l2a <command>: warning: ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in what the user asked for (reported in one line, exit code 2)."""


USER_ERRORS = (UsageError, ValueError, OSError, ImportError)
"""Exceptions that describe the user's input or environment: bad values and paths, missing files, a
missing optional dependency. Anything else is a bug and keeps its traceback."""

_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_TRUE = {"1", "on", "yes", "true"}


def one_line(error: BaseException) -> str:
    """The error's message on one line (OS errors as `reason: 'path'`, KeyErrors without quotes)."""
    if isinstance(error, OSError) and error.strerror and error.filename is not None:
        text = f"{error.strerror}: {str(error.filename)!r}"
    elif isinstance(error, KeyError) and error.args:
        text = str(error.args[0])
    else:
        text = str(error)
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    return text or type(error).__name__


@contextlib.contextmanager
def _one_line_warnings(command: str) -> Iterator[None]:
    """Show warnings issued from l2a's code as `l2a <command>: warning: ...`; others as usual."""
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if str(Path(filename).resolve()).startswith(_PACKAGE_DIR):
            print(f"l2a {command}: warning: {one_line(Exception(str(message)))}", file=sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def run_command(
    command: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace
) -> int:
    """Run a sub-command's handler; user mistakes become one line on stderr and exit code 2."""
    with _one_line_warnings(command):
        try:
            return int(func(args) or 0)
        except KeyboardInterrupt:
            print(f"\nl2a {command}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except USER_ERRORS as error:
            if os.environ.get("L2A_DEBUG", "").lower() in _TRUE:
                raise
            print(f"l2a {command}: error: {one_line(error)}", file=sys.stderr)
            return EXIT_USAGE


def hub_offline() -> bool:
    """Whether transformers / huggingface_hub are told not to reach the Hub."""
    return any(
        os.environ.get(name, "").lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def looks_local(path: str) -> bool:
    """Whether `path` can only mean a local path: it starts with ./ ../ / ~, is no valid Hub repo id
    (`name` or `org/name`), or its parent directory exists here."""
    if path.startswith(("/", "./", "../", "~", ".\\", "..\\")) or path in (".", ".."):
        return True
    if not _HUB_ID.fullmatch(path):
        return True
    parent = os.path.dirname(path)
    return bool(parent) and os.path.isdir(parent)


def check_model_path(path: str, what: str = "model") -> str:
    """Refuse a missing local model/tokenizer path before transformers spends ~30 s retrying the Hub.

    Returns the path with `~` expanded. A path that exists must be a directory (with config.json when
    `what` is a model); one that does not exist is refused when it looks local or the Hub is offline.
    """
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        if not os.path.isdir(expanded):
            raise UsageError(f"{what} {path!r} is a file, not a directory")
        if what.endswith("model") and not os.path.isfile(os.path.join(expanded, "config.json")):
            raise UsageError(f"{what} directory {path!r} has no config.json")
        return expanded
    if looks_local(path):
        raise UsageError(f"{what} {path!r} does not exist")
    if hub_offline():
        raise UsageError(f"{what} {path!r} does not exist locally (and HF_HUB_OFFLINE is set)")
    return path


def check_corpus(sources: Sequence[str], what: str) -> None:
    """Every corpus source exists and together they hold at least one non-empty document."""
    from l2a.data.corpora import STDLIB, iter_documents

    for source in sources:
        if str(source) != STDLIB and not os.path.exists(source):
            raise UsageError(f"{what}: corpus source {str(source)!r} does not exist")
    try:
        first = next(iter(iter_documents(list(sources))), None)
    except (KeyError, ValueError) as error:  # a record without the text field, a broken JSON line
        raise UsageError(f"{what}: cannot read {list(sources)}: {one_line(error)}") from None
    if first is None:
        raise UsageError(
            f"{what}: corpus {list(sources)} holds no text documents (.txt/.py/.md files, .jsonl or .parquet)"
        )


def check_device(device: str | None, what: str = "device") -> None:
    """`cuda` / `cuda:N` needs that GPU; other names are left to the command's own parsing."""
    if device is None or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"{what} {device!r}: CUDA is not available on this machine")
    index = device.partition(":")[2]
    if index.isdigit() and int(index) >= torch.cuda.device_count():
        raise UsageError(f"{what} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def prepare_output_dir(path: str | Path, *, force: bool, outputs: Sequence[str]) -> Path:
    """Refuse a non-empty output directory unless `force`; with `force`, delete what an earlier run of the
    command wrote there: the top-level entries whose names match `outputs` (names or globs). Nothing
    else in the directory, and nothing outside it, is touched (symlinks are removed, never followed)."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"output directory {str(path)!r} is a file")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not force:
        raise UsageError(
            f"output directory {str(path)!r} is not empty (use --force to replace an earlier run's results)"
        )
    for entry in sorted(out.iterdir()):
        if not any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in outputs):
            continue
        if entry.is_symlink() or not entry.is_dir():
            entry.unlink()
        else:
            shutil.rmtree(entry)
    return out
