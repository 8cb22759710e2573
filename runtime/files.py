"""Atomic writes and file digests: a power cut or a crash never leaves half a bundle or half a result."""

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from edgeinspect.runtime.console import InspectError


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


def writable_dir(path: Path, option: str, *, shown: Path | None = None) -> Path:
    """Create the output folder `option` names (with its parents) and prove it writable with a probe file, so
    that a command fails at once with one line naming the option, not after its work or with a traceback.
    Call it where a command starts, before any computing; returns the folder. Errors (InspectError):
    "OPTION PATH: is a file, not a folder" (PATH or one of its parents is a file), "OPTION PATH: cannot write
    there (REASON)" (read-only folder or file system, no permission, no space...). `shown`: the path the user gave,
    named in errors instead of PATH (the file whose folder this is)."""
    path = Path(path)
    named = path if shown is None else Path(shown)
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                what = "is a file" if folder == named else f"{folder} is a file"
                raise InspectError(f"{option} {named}: {what}, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise InspectError(f"{option} {named}: is a file, not a folder") from None
    except OSError as error:
        raise InspectError(f"{option} {named}: cannot write there ({error.strerror or error})") from None
    return path


def writable_file_parent(path: Path, option: str) -> Path:
    """For an option naming an output FILE: refuse a folder at that path, create the file's folder and prove it
    writable (as writable_dir does); returns the file's path. The file itself is written later, atomically."""
    path = Path(path)
    if path.is_dir():
        raise InspectError(f"{option} {path}: is a folder; give a file name")
    writable_dir(path.parent, option, shown=path)
    return path


STAGING_PATTERN = re.compile(r"\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)(?:-[A-Za-z0-9_]+)?")
LEGACY_STAGING = re.compile(r"\.(?P<name>.+)\.staging-[a-z0-9_]{8}")  # before staging folders carried the pid
LEGACY_STAGING_AGE_S = 24 * 3600


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts as alive)."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, someone else's
        return True
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove what killed writers of `target` left beside it: `.NAME.staging-PID-XXXX` folders of processes that
    are no longer alive, `.NAME.old-PID` folders of dead processes once `target` exists again, and staging
    folders from before they carried a pid (`.NAME.staging-XXXXXXXX`) not touched for a day. Returns them."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    removed = []
    for entry in target.parent.iterdir():
        match = STAGING_PATTERN.fullmatch(entry.name)
        if match and match["name"] == target.name and entry.is_dir() and not entry.is_symlink():
            stale = not process_alive(int(match["pid"])) and (match["kind"] == "staging" or target.exists())
        else:
            legacy = LEGACY_STAGING.fullmatch(entry.name)
            try:
                stale = (legacy is not None and legacy["name"] == target.name and entry.is_dir()
                         and not entry.is_symlink() and time.time() - entry.stat().st_mtime > LEGACY_STAGING_AGE_S)
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def staging_dir(target: Path) -> Path:
    """A new, empty staging folder beside `target` (`.NAME.staging-PID-XXXX`) to write a whole folder into before
    replace_dir swaps it in; stale staging folders of killed processes are removed first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.staging-{os.getpid()}-"))


@contextlib.contextmanager
def staged_dir(target: Path, copy_of: Path | None = None):
    """A staging folder (a copy of `copy_of`, else empty) to write the new `target` in: swapped into place when the
    block ends, removed when it raises, so a reader sees the old folder or the new one, never half of one."""
    staging = staging_dir(target)
    try:
        if copy_of is not None:
            shutil.copytree(copy_of, staging, dirs_exist_ok=True)
        yield staging
        replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


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
