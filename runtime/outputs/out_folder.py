"""inspect-run's --out folder: one run at a time (a lock), a run id and per-source name parts that make every
file name unique across restarts and sources, and the sizes and ages its retention options take."""

import fcntl
import hashlib
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

from edgeinspect.runtime.console import InspectError

LOCK_FILE = ".inspect-run.lock"
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12,
         "tb": 10**12}


def source_file_part(label: str) -> str:
    """A source's label as part of a file name: its last 40 characters that are safe in one, and 8 hex digits of
    the whole label's hash, so two sources whose labels end alike never write the same file."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-._")[-40:].strip("-._") or "source"
    return f"{safe}-{hashlib.sha256(label.encode()).hexdigest()[:8]}"


def new_run_id() -> str:
    """UTC start time and 16 random bits: sortable, and distinct for two runs started in the same second."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(2)


class OutLock:
    """An exclusive lock on --out for the life of the run: two runs writing one folder would interleave their
    logs and overwrite each other's overlays. The kernel drops it when the process dies, however it dies."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self.fd, 64).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise InspectError(f"--out {out}: another inspect-run (pid {holder}) is writing there; give each run "
                               "its own --out") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        os.close(self.fd)


def parse_bytes(text: str, option: str) -> int:
    """'50MB', '2G', '500k', '1000000' → bytes (decimal units); anything else is a one-line error."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text or "")
    unit = match and match.group(2).lower()
    if not match or unit not in UNITS or float(match.group(1)) <= 0:
        raise InspectError(f"{option} {text!r}: give a size such as 500MB, 2GB or 1000000 (bytes)")
    return int(float(match.group(1)) * UNITS[unit])


def positive_finite(value: float | None, option: str) -> float | None:
    if value is not None and not (value > 0 and value != float("inf")):
        raise InspectError(f"{option} must be a positive number, got {value}")
    return value
