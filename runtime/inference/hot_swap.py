"""A new version of the running bundle taken in without stopping the line: when the bundle folder is replaced
(inspect-teach, a copy from the workstation swapped in whole) or on SIGHUP, the new version is loaded, verified
(digests, graph, --trust) and warmed in a thread of its own, beside the version that keeps inspecting; the frame
loop then takes it between two inference calls, so no frame is lost or scored twice and each record names the
version that scored it. A version that fails is refused with an alarm saying why, and the running one goes on."""

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeinspect.runtime.console import InspectError, console
from edgeinspect.runtime.inference.bundle import BUNDLE_RECORD, Bundle, load_bundle
from edgeinspect.runtime.inference.inspector import Inspector

ALARM = "bundle"  # the health alarm's kind while a new version is refused


def bundle_fingerprint(bundle_dir: Path) -> tuple[int, int, int] | None:
    """bundle.json's inode, modification time and size: every way a version is written (a folder swapped in, the
    record replaced atomically) changes it. None while the folder is being swapped."""
    try:
        status = os.stat(Path(bundle_dir) / BUNDLE_RECORD)
    except OSError:
        return None
    return status.st_ino, status.st_mtime_ns, status.st_size


class HotSwap:
    """`target.inspector` replaced by the bundle's new version. `open_inspector(bundle)` opens one as the run
    opened the first (same backend and precision asked); `alarm(message)` raises the bundle alarm, `alarm(None)`
    clears it."""

    RETRY_S = 10.0  # a refused version is tried again this often (a copy into the folder may still be arriving)

    def __init__(self, target, bundle_dir: Path, open_inspector: Callable[[Bundle], Inspector],
                 alarm: Callable[[str | None], None], trust: list[Path] | None = None, poll_s: float = 1.0,
                 seen: tuple[int, int, int] | None = None):
        """`seen`: bundle.json's fingerprint when the running version was loaded (default: now)."""
        self.target, self.bundle_dir, self.open_inspector = target, Path(bundle_dir), open_inspector
        self.alarm, self.trust, self.poll_s = alarm, trust, poll_s
        self.seen = seen or bundle_fingerprint(self.bundle_dir)
        self.refused_at: float | None = None
        self.asked = threading.Event()
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None
        self.swaps = 0
        self.taken: list[Callable[[Inspector], None]] = []  # told of each version taken in

    def request(self) -> None:
        """Load the bundle again now (SIGHUP), changed or not."""
        self.asked.set()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._watch, name="hot-swap", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def _watch(self) -> None:
        while not self.stopping.is_set():
            self.asked.wait(self.poll_s)
            fingerprint = bundle_fingerprint(self.bundle_dir)
            retry = self.refused_at is not None and time.monotonic() - self.refused_at >= self.RETRY_S
            if fingerprint is None or not (self.asked.is_set() or fingerprint != self.seen or retry):
                continue
            self.asked.clear()
            self.seen = fingerprint
            self.refused_at = None if self.swap() else time.monotonic()

    def swap(self) -> bool:
        """Load, check and warm the bundle as it is now, and hand it to the frame loop; False if refused."""
        running = self.target.inspector
        try:
            bundle = load_bundle(self.bundle_dir, trust=self.trust)
            inspector = self.open_inspector(bundle)
            inspector.infer(np.zeros((1, *bundle.input_size, 3), dtype=np.uint8))  # warm before the first frame
        except Exception as error:  # noqa: BLE001 - whatever fails, the running version goes on
            reason = str(error) if isinstance(error, InspectError) else f"{type(error).__name__}: {error}"
            self.alarm(f"the bundle in {self.bundle_dir} was not taken ({reason}); version {running.version} "
                       "keeps inspecting")
            return False
        self.target.inspector = inspector
        self.swaps += 1
        self.alarm(None)
        for listener in self.taken:
            listener(inspector)
        console.print(f"bundle version {inspector.version} in use from the next frames (was {running.version}); "
                      f"backend {inspector.backend.name} ({inspector.precision})")
        return True
