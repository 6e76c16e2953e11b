"""Reading user-given weights files and loading them strictly, shared by every task.

Project convention: checkpoints load with safetensors or ``torch.load(weights_only=True)``, never
by unpickling arbitrary objects. Every problem a user can cause (a missing, unreadable or corrupt
file, or one whose keys do not fit the model) raises :class:`~benchsuite.errors.DataError` with a
one-line message.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from benchsuite.errors import DataError

_log = logging.getLogger(__name__)

__all__ = ["TORCH_SUFFIXES", "file_sha256", "load_into", "load_weights_file"]

#: Suffixes read with ``torch.load(weights_only=True)``; everything else is read as safetensors.
TORCH_SUFFIXES = (".pt", ".pth", ".bin")

#: Keys under which training checkpoints commonly nest the model's state dict.
_NESTED_KEYS = ("state_dict", "model")


def load_weights_file(path: str | Path, label: str = "model") -> dict[str, torch.Tensor]:
    """A state dict (on the CPU) from safetensors, or a weights-only torch checkpoint.

    ``.pt``/``.pth``/``.bin`` files go through ``torch.load(weights_only=True)``; a checkpoint that
    nests the weights under ``"state_dict"`` or ``"model"`` is unwrapped. ``label`` names the weights
    in error messages ("digits weights ...").
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{label} weights file {str(path)!r} does not exist")
    try:
        if path.suffix.lower() in TORCH_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, Mapping):
                for key in _NESTED_KEYS:
                    if isinstance(state.get(key), Mapping):
                        state = state[key]
                        break
        else:
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - every reader error means a bad file
        raise DataError(f"cannot read {label} weights {str(path)!r}: {_first_line(exc)}") from None
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(f"{label} weights {str(path)!r} hold no tensor state dict")
    return dict(state)


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    model_name: str,
    label: str = "model",
) -> None:
    """``model.load_state_dict(state, strict=True)``; a mismatch raises a one-line DataError.

    The message names up to three missing and three unexpected keys (with their counts), or the
    first shape mismatch. Floating tensors are cast to the parameter's dtype by ``load_state_dict``
    itself (e.g. float16 files into a float32 model).
    """
    expected = set(model.state_dict().keys())
    given = set(state.keys())
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    where = f"{label} weights {str(source)!r} do not fit {model_name}"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_some(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_some(unexpected)}")
        raise DataError(f"{where}: {'; '.join(parts)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise DataError(f"{where}: {detail}") from None


_sha_cache: dict[tuple[str, int, int], str] = {}
_sha_lock = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, remembered per (path, size, mtime) within the process."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    with _sha_lock:
        if key in _sha_cache:
            return _sha_cache[key]
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    value = digest.hexdigest()
    with _sha_lock:
        _sha_cache[key] = value
    return value


def _some(keys: Sequence[str], shown: int = 3) -> str:
    return ", ".join(keys[:shown]) + (", ..." if len(keys) > shown else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def save_safetensors_atomic(state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Write ``state`` as safetensors to ``path`` atomically (temp file + rename), world-readable.

    A crash or Ctrl-C mid-write leaves the previous file (or none), never a truncated one that a
    later run would take for trained weights.
    """
    import os
    import tempfile

    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(dict(state), tmp, metadata=dict(metadata))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is ordinary user data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_trained_weights(
    path: Path,
    train: Callable[[], dict[str, torch.Tensor]],
    *,
    label: str,
    metadata: Mapping[str, str],
    lock: threading.Lock | threading.RLock,
) -> dict[str, torch.Tensor]:
    """Weights a demo task trains itself: from the cache, or trained and cached first.

    The cache is benchsuite's own, so a damaged file is retrained (with a warning), not fatal.
    """
    with lock:
        if path.is_file():
            try:
                return load_weights_file(path, label=label)
            except DataError as exc:
                _log.warning("%s; retraining", exc)
        state = train()
        save_safetensors_atomic(state, path, metadata)
        return state
