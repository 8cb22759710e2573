"""Capture in its own thread per source, never waiting on inference: each grabber queues its source's frames for
the frame loop.

`every` keeps each frame in order (files, folders); `latest` keeps the newest frame of each source and counts the
ones it replaced (cameras: the verdict is about now, not about a backlog)."""

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from edgeinspect.runtime.capture.sources import FrameSource


@dataclass
class Frame:
    index: int  # per source
    name: str
    rgb: np.ndarray | None  # None: the frame could not be decoded (`error` says why)
    capture_ms: float
    source: str = ""
    error: str | None = None


class Grabber(threading.Thread):
    """Reads one source into a bounded queue (`every`: back-pressure, nothing lost) or a one-frame slot
    (`latest`: a newer frame replaces an unprocessed one, which counts as dropped). Grabbers of one run share
    a condition, so the loop can wait for a frame from any of them."""

    def __init__(self, source: FrameSource, mode: str, stop: threading.Event, queue_size: int = 8,
                 label: str = "", condition: threading.Condition | None = None):
        super().__init__(name=f"frame-grabber {label}".strip(), daemon=True)
        self.source, self.mode, self.stop, self.label = source, mode, stop, label
        self.queue: deque[Frame] = deque()
        self.queue_size = queue_size
        self.condition = condition or threading.Condition()
        self.finished = False
        self.dropped = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            index, clock = 0, time.perf_counter()
            for name, rgb, error in self.source.frames(self.stop):
                self._put(Frame(index, name, rgb, (time.perf_counter() - clock) * 1000, self.label, error))
                index += 1
                clock = time.perf_counter()
        except BaseException as error:  # handed to the main thread, which reports it
            self.error = error
        finally:
            with self.condition:
                self.finished = True
                self.condition.notify_all()

    def _put(self, frame: Frame) -> None:
        with self.condition:
            if self.mode == "latest":
                self.dropped += len(self.queue)
                self.queue.clear()
            else:
                while len(self.queue) >= self.queue_size and not self.stop.is_set():
                    self.condition.wait(0.1)
            self.queue.append(frame)
            self.condition.notify_all()

    def take(self, count: int) -> list[Frame]:
        """Up to `count` frames (at least one), or [] once the source has ended or the run is stopping."""
        return Grabbers([self]).take(count)


class Grabbers:
    """The grabbers of all sources of a run, read as one: each `take` returns the frames waiting at every
    source (round-robin, so one busy source cannot starve the others), for one inference call."""

    def __init__(self, grabbers: list[Grabber]):
        self.grabbers = grabbers
        self.condition = grabbers[0].condition
        self.stop = grabbers[0].stop

    def start(self) -> None:
        for grabber in self.grabbers:
            grabber.start()

    def join(self, timeout: float) -> None:
        """Wait for every grabber to end, `timeout` seconds for all of them together."""
        deadline = time.monotonic() + timeout
        for grabber in self.grabbers:
            grabber.join(max(0.0, deadline - time.monotonic()))

    @property
    def error(self) -> BaseException | None:
        return next((g.error for g in self.grabbers if g.error is not None), None)

    def take(self, count: int, waiting=lambda: None) -> list[Frame]:
        """Up to `count` frames, at least one, or [] once every source has ended or the run is stopping;
        `waiting()` is called every 0.1 s while there is none."""
        with self.condition:
            while (not any(g.queue for g in self.grabbers) and not all(g.finished for g in self.grabbers)
                   and not self.stop.is_set()):
                self.condition.wait(0.1)
                waiting()
            taken = []
            while len(taken) < count and any(g.queue for g in self.grabbers):
                for grabber in self.grabbers:  # one frame from each in turn, and none taken beyond `count`
                    if grabber.queue and len(taken) < count:
                        taken.append(grabber.queue.popleft())
            self.condition.notify_all()
            return taken
