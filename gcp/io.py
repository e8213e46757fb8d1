"""gcp's file layer, below everything else (it imports nothing of gcp): atomic writes, so that a checkpoint or
report is either the old file or the complete new one, never half; and the one reading of a torch file, so that
a model file and a training checkpoint that cannot be read fail the same way, in one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


class ModelFileError(ValueError):
    """A model file (or training checkpoint) cannot be used. The message is one line naming the file and what is
    wrong with it, so the command line can show it as it is (a ValueError, as the loader raised before this
    class existed)."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, shortened: what a one-line report can quote of a library's
    error (torch's unpickling errors run over a dozen lines)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_torch_dict(path: Path, what: str) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` of a file gcp wrote (``what``: "model file", "training checkpoint"),
    onto the CPU, with each way it can fail told in one line: a copy cut short by a kill or a full disk,
    a file that is not PyTorch's, pickled code, or something other than the dict gcp writes."""
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only refused an object: pickled code, which gcp never writes
        raise ModelFileError(
            f"{path}: not a gcp {what}: it holds pickled Python objects, which gcp never loads "
            "(torch.load(weights_only=True) refuses them)"
        ) from None
    except Exception as error:  # noqa: BLE001 (torch raises RuntimeError, EOFError, ...; all mean unreadable)
        if path.stat().st_size == 0:
            problem = "empty file"
        elif not zipfile.is_zipfile(path):
            problem = (
                f"truncated or not a PyTorch file ({path.stat().st_size} bytes, no complete zip archive)"
            )
        else:
            problem = f"damaged PyTorch file ({one_line(error)})"
        raise ModelFileError(f"{path}: cannot read the {what}: {problem}") from None
    if not isinstance(payload, dict):
        raise ModelFileError(f"{path}: not a gcp {what} (it holds a {type(payload).__name__}, not a dict)")
    return payload


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and an atomic rename.

    A crash (or a kill during training) leaves either the previous file or the new one, never a truncated one,
    which is what makes ``resume=`` safe.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Text flavour of :func:`atomic_write_bytes` (UTF-8)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Serialise ``obj`` as indented JSON and write it atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` into memory, then :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (model files are large): how a run recognises that
    the model or data it was made from are still the same files."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
