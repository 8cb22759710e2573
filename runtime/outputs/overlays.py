"""NG (or all) frames saved with the heat map overlaid, in one folder per UTC day, under names unique across
restarts (run id, source, frame index), and the disk budget of the run folder: --max-disk and --keep-days
delete the oldest first, overlays before rotated logs (the current log is never deleted)."""

import re
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path

import cv2
from edgeinspect.runtime.console import RateLimitedWarning
from edgeinspect.runtime.files import atomic_write_bytes
from edgeinspect.runtime.outputs.out_folder import source_file_part
from edgeinspect.runtime.outputs.run_log import LOG_FILE
from edgeinspect.runtime.outputs.sinks import Inspected, Sink

OVERLAY_FOLDER = "overlays"


class DiskBudget:
    """Tracks the files the run folder accumulates (overlays, rotated logs: found on disk at the start, then
    told of each new one) and deletes the oldest while their total, with the current log, is over
    `max_bytes`, or while the oldest is older than `keep_days`."""

    AGE_CHECK_S = 60.0
    HEADROOM = 64 * 1024  # for what is written between checks (log lines) and is not tracked (lock, summary)

    def __init__(self, out: Path, max_bytes: int | None = None, keep_days: float | None = None,
                 warn_limited: RateLimitedWarning | None = None):
        self.out, self.max_bytes, self.keep_days = Path(out), max_bytes, keep_days
        self.warn = warn_limited or RateLimitedWarning()
        self.files = {"overlay": deque(), "log": deque()}  # (mtime, path, bytes), oldest first
        self.total = 0
        self.deleted = 0
        self.last_age_check = 0.0
        found = [("overlay", p) for p in (self.out / OVERLAY_FOLDER).glob("*/*.jpg")]
        found += [("log", p) for p in self.out.glob("inspections-*.jsonl*")]
        for kind, path in sorted(found, key=lambda item: item[1].stat().st_mtime):
            self.add(kind, path, enforce=False)
        self.enforce()

    def add(self, kind: str, path: Path, size: int | None = None, enforce: bool = True) -> None:
        stat = path.stat()
        self.files[kind].append((stat.st_mtime, path, stat.st_size if size is None else size))
        self.total += self.files[kind][-1][2]
        if enforce:
            self.enforce()

    def _current_log_bytes(self) -> int:
        try:
            return (self.out / LOG_FILE).stat().st_size
        except FileNotFoundError:
            return 0

    def _oldest(self) -> tuple[str, tuple] | None:
        for kind in ("overlay", "log"):
            if self.files[kind]:
                return kind, self.files[kind][0]
        return None

    def enforce(self, incoming: int = 0) -> None:
        """Delete the oldest until the tracked files, the current log and `incoming` bytes about to be written
        fit `max_bytes`, and what is older than `keep_days`."""
        if self.max_bytes:
            limit = self.max_bytes - min(self.HEADROOM, self.max_bytes // 100)
            while self.total + self._current_log_bytes() + incoming > limit and self._delete_oldest():
                pass
        now = time.time()
        if self.keep_days and now - self.last_age_check >= self.AGE_CHECK_S:
            self.last_age_check = now
            limit = now - self.keep_days * 86400
            for kind in ("overlay", "log"):
                while self.files[kind] and self.files[kind][0][0] < limit:
                    self._delete(kind)

    def _delete_oldest(self) -> bool:
        oldest = self._oldest()
        if oldest is None:
            return False
        self._delete(oldest[0])
        return True

    def _delete(self, kind: str) -> None:
        _, path, size = self.files[kind].popleft()
        self.total -= size
        try:
            path.unlink(missing_ok=True)
            self.deleted += 1
            if kind == "overlay" and path.parent != self.out and not any(path.parent.iterdir()):
                path.parent.rmdir()
        except OSError as error:
            self.warn("retention", f"{path}: could not delete ({error.strerror or error})")


class OverlayStore(Sink):
    """Saves the frames `save` asks for (ng, all) as JPEG overlays; adds their path to the record."""

    def __init__(self, out: Path, save: str, run_id: str, budget: DiskBudget | None = None,
                 warn_limited: RateLimitedWarning | None = None):
        self.folder, self.save, self.run_id, self.budget = Path(out) / OVERLAY_FOLDER, save, run_id, budget
        self.warn = warn_limited or RateLimitedWarning()

    def wanted(self, item: Inspected) -> bool:
        return not item.skipped and (self.save == "all" or (self.save == "ng" and item.verdict == "NG"))

    def handle(self, item: Inspected) -> None:
        if not self.wanted(item):
            return
        record = item.record
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        source = source_file_part(str(record.get("source", "")))
        stem = re.sub(r"[^A-Za-z0-9.-]+", "-", Path(str(record["name"])).stem)[:60]
        path = self.folder / day / f"{self.run_id}_{source}_{record['frame']:06d}_{stem}.jpg"
        data = cv2.imencode(".jpg", item.overlay(), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
        if self.budget is not None:
            self.budget.enforce(incoming=len(data))  # room first: the folder never goes over, even for a moment
        try:
            atomic_write_bytes(path, data)
        except OSError as error:
            record["overlay_error"] = error.strerror or str(error)
            self.warn("overlay", f"{path.parent}: overlay not saved ({record['overlay_error']}); the run goes on")
            return
        record["overlay"] = str(path)
        if self.budget is not None:
            self.budget.add("overlay", path, len(data), enforce=False)
