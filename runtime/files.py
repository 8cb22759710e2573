"""Atomic writes and file digests: a power cut or a crash never leaves half a bundle or half a result."""

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .console import InspectError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, record: dict) -> None:
    atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())


def replace_dir(staging: Path, target: Path) -> None:
    """Swap a fully written staging folder into place; the old folder is removed only after the swap."""
    staging, target = Path(staging), Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def writable_dir(path: Path, option: str) -> Path:
    """Create the output folder `option` names and prove it writable with a probe file, so that a command fails
    at once with one line, not after its work or with a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise InspectError(f"{option} {path}: is a file, not a folder") from None
    except OSError as error:
        raise InspectError(f"{option} {path}: cannot write there ({error.strerror or error})") from None
    return path


def cache_dir(kind: str) -> Path:
    """A per-machine cache folder (TensorRT timing caches, ONNX Runtime's engine cache): never inside a bundle,
    which is copied to other devices. $EDGE_INSPECT_CACHE, else $XDG_CACHE_HOME/edge-inspect, else
    ~/.cache/edge-inspect."""
    root = os.environ.get("EDGE_INSPECT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-inspect"
    return Path(root) / kind


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
