"""Facts about the machine and libraries that every result records, and seeding."""

from __future__ import annotations

import platform
import random
import resource
import sys
from importlib import metadata

import numpy as np
import torch

from benchsuite.errors import BenchsuiteError

_TRACKED_PACKAGES = ("benchsuite", "torch", "timm", "numpy", "torchvision", "safetensors")


def library_versions() -> dict[str, str]:
    """Versions of the packages a result's numbers depend on, plus Python's."""
    versions = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch, so a cell's random choices follow from its seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(requested: str) -> str:
    """``auto`` picks cuda when present; a cuda request without a GPU is a user error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise BenchsuiteError(f"--device {requested} asked for, but torch sees no CUDA device")
    if not (requested == "cpu" or requested.startswith("cuda") or requested == "mps"):
        raise BenchsuiteError(f"unknown device {requested!r}; use cpu, cuda, cuda:N or auto")
    return requested


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


class PeakMemory:
    """Peak memory of a piece of work: GPU allocator peak on CUDA, process max RSS on CPU.

    On CPU the kernel only reports the process-wide high-water mark, so the value is the peak of
    the whole process up to the end of the cell (recorded as such in ``kind``).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.startswith("cuda") else "process_max_rss"

    def __enter__(self) -> PeakMemory:
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats(torch.device(self.device))
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def megabytes(self) -> float:
        if self.kind == "cuda_max_allocated":
            return torch.cuda.max_memory_allocated(torch.device(self.device)) / 2**20
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
