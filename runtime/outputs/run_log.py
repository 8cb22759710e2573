"""inspections.jsonl: one complete JSON line per frame, on disk at once, for months. Each line goes down in
one write; a write the disk cut short is taken back, so the log never holds half a line, and a half line
left by a crash is cut off when the next run opens the log. The log rotates by size or by day (rotated files
are whole lines, optionally gzipped in the background). When the disk is full, lines wait in memory
(bounded), the run goes on inspecting and publishing, the problem is said once a minute, and the lines are
written when space returns."""

import errno
import gzip
import json
import math
import os
import shutil
import threading
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

from edgeinspect.runtime.console import RateLimitedWarning, warn
from edgeinspect.runtime.outputs.sinks import Inspected, Sink

LOG_FILE = "inspections.jsonl"
WAITING_LINES_MAX = 100_000  # lines kept in memory while the disk is full (~40 MB)


def json_line(record: dict) -> bytes:
    """The record as one line of strict JSON: a non-finite number (never a valid JSON value) becomes null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, list):
            return [finite(item) for item in value]
        return value
    return (json.dumps(finite(record), allow_nan=False) + "\n").encode()


def cut_partial_line(path: Path) -> int:
    """Drop a last line without its newline (a crash mid-write); returns the bytes dropped."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        block = min(size, 1 << 20)
        f.seek(size - block)
        tail = f.read(block)
        if tail.endswith(b"\n"):
            return 0
        keep = size - block + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
        f.truncate(keep)
        return size - keep


class JsonLog(Sink):
    """The JSON-lines log of a run folder. `rotate_bytes` / `rotate_daily` start a new file, the old one
    renamed inspections-YYYYmmddTHHMMSSZ.jsonl (and gzipped with `compress`); `on_rotated(path)` hears of
    each rotated file (the disk budget counts and deletes them)."""

    def __init__(self, folder: Path, rotate_bytes: int | None = None, rotate_daily: bool = False,
                 compress: bool = False, on_rotated=None, warn_limited: RateLimitedWarning | None = None):
        self.folder, self.path = Path(folder), Path(folder) / LOG_FILE
        self.rotate_bytes, self.rotate_daily, self.compress = rotate_bytes, rotate_daily, compress
        self.on_rotated = on_rotated or (lambda path: None)
        self.warn = warn_limited or RateLimitedWarning()
        dropped = cut_partial_line(self.path)
        if dropped:
            warn(f"{self.path}: cut off a half-written last line ({dropped} bytes) left by an earlier run")
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size = os.fstat(self.fd).st_size
        self.day = self._today()
        self.waiting: deque[bytes] = deque()
        self.lost = 0
        self.compressors: list[threading.Thread] = []
        self.lock = threading.Lock()  # the frame loop writes frames, the health thread alarm lines
        self.closed = False

    @staticmethod
    def _today() -> str:
        return datetime.now(timezone.utc).strftime("%Y-%m-%d")

    def handle(self, item: Inspected) -> None:
        self.write(item.record)

    def write(self, record: dict) -> None:
        """Append one record as a line (a frame's, or another thread's alarm line); nothing after close()."""
        with self.lock:
            if self.closed:
                return
            if len(self.waiting) >= WAITING_LINES_MAX:
                self.waiting.popleft()
                self.lost += 1
            self.waiting.append(json_line(record))
            self.flush()

    def flush(self) -> None:
        """Write the waiting lines, oldest first, each whole or not at all."""
        while self.waiting:
            line = self.waiting[0]
            if self._rotation_due(len(line)):
                self.rotate()
            try:
                written = os.write(self.fd, line)
            except OSError as error:
                self._disk_problem(error)
                return
            if written < len(line):  # the disk filled up inside the line: take the part back
                os.ftruncate(self.fd, self.size)
                self._disk_problem(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
                return
            self.size += written
            self.waiting.popleft()

    def _disk_problem(self, error: OSError) -> None:
        self.warn("log", f"{self.path}: cannot write ({error.strerror or error}); inspecting and publishing go on, "
                         f"{len(self.waiting)} line(s) wait in memory and are written when space returns"
                  + (f", {self.lost} oldest lost" if self.lost else ""))

    def _rotation_due(self, incoming: int) -> bool:
        if self.size == 0:
            return False
        if self.rotate_bytes and self.size + incoming > self.rotate_bytes:
            return True
        return self.rotate_daily and self._today() != self.day

    def rotate(self) -> None:
        """Close this file under a dated name and start an empty one; gzip the closed file in the background."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        rotated = self.folder / f"inspections-{stamp}.jsonl"
        os.fsync(self.fd)
        os.close(self.fd)
        os.replace(self.path, rotated)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.size, self.day = 0, self._today()
        if self.compress:
            thread = threading.Thread(target=self._gzip, args=(rotated,), name="log-gzip", daemon=False)
            thread.start()
            self.compressors = [t for t in self.compressors if t.is_alive()] + [thread]
        else:
            self.on_rotated(rotated)

    def _gzip(self, path: Path) -> None:
        target = path.with_name(path.name + ".gz")
        partial = target.with_name("." + target.name + ".tmp")
        try:
            with open(path, "rb") as source, gzip.open(partial, "wb") as sink:
                shutil.copyfileobj(source, sink)
            os.replace(partial, target)
            path.unlink()
            self.on_rotated(target)
        except OSError as error:  # no space for the compressed copy: keep the plain file
            partial.unlink(missing_ok=True)
            self.warn("gzip", f"{path}: not compressed ({error.strerror or error}); kept as it is")
            self.on_rotated(path)

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.flush()
        if self.waiting:
            warn(f"{self.path}: {len(self.waiting)} line(s) could not be written (disk full)")
        os.fsync(self.fd)
        os.close(self.fd)
        for thread in self.compressors:
            thread.join()
