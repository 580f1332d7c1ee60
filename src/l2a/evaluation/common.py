"""Small helpers shared by the evaluation modules: lengths, devices, timing."""

from __future__ import annotations

import re
import time

import torch

_LENGTH = re.compile(r"^\s*(\d+)\s*([kKmM]?)\s*$")


def parse_length(text: str | int) -> int:
    """Parse a sequence length: ``"4k"`` → 4096, ``"16K"`` → 16384, ``"1m"`` → 1048576, ``"512"`` → 512."""
    if isinstance(text, int):
        value = text
    else:
        match = _LENGTH.match(text)
        if match is None:
            raise ValueError(
                f"cannot parse length {text!r}: expected an integer with optional k/m suffix (4k, 512)"
            )
        value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
    if value <= 0:
        raise ValueError(f"length must be positive, got {text!r}")
    return value


def parse_lengths(text: str) -> list[int]:
    """Parse a comma-separated list of lengths (``"4k,8k,16k"``), keeping order and dropping repeats."""
    lengths = [parse_length(part) for part in text.split(",") if part.strip()]
    if not lengths:
        raise ValueError(f"no lengths in {text!r}")
    return list(dict.fromkeys(lengths))


def format_length(n: int) -> str:
    """Inverse of `parse_length` for display: 4096 → ``"4K"``, 1000 → ``"1000"``."""
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)}M"
    if n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first parameter (or its ``device`` attribute for parameter-free models)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so that host timers measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device: torch.device) -> float:
    """A wall-clock reading in seconds taken after all queued work on ``device`` finished."""
    synchronize(device)
    return time.perf_counter()


def is_l2a_model(model: torch.nn.Module) -> bool:
    """True for models with an L2A config (``model_type == "l2a"``)."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) == "l2a"
