"""The frame loop of inspect-run: capture in its own thread per source (never waiting on inference), then
resize → one inference call for the frames of all sources → verdict, regions, and a record per frame for
the sinks, with per-stage latency and a summary at the end.

`every` processes each frame in order (files, folders); `latest` processes the newest frame of each source
and counts the ones it skipped (cameras: the verdict is about now, not about a backlog)."""

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .console import InspectError
from .sources import FrameSource

STAGES = ("capture", "preprocess", "inference", "postprocess", "output")  # output: the sinks
MAX_BATCH = 1024  # frames in one inference call (--batch): their images are held at once, queued twice over


def check_batch_and_threads(batch: int, threads: int | None) -> None:
    """--batch and --threads of the commands that run frames through a backend (inspect-run, inspect-bench)."""
    if batch < 1:
        raise InspectError(f"--batch must be at least 1, got {batch}")
    if batch > MAX_BATCH:
        raise InspectError(f"--batch must be at most {MAX_BATCH}, got {batch}")
    if threads is not None and threads < 1:
        raise InspectError(f"--threads must be at least 1, got {threads}")


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
        for grabber in self.grabbers:
            grabber.join(timeout)

    @property
    def error(self) -> BaseException | None:
        return next((g.error for g in self.grabbers if g.error is not None), None)

    def take(self, count: int) -> list[Frame]:
        """Up to `count` frames, at least one, or [] once every source has ended or the run is stopping."""
        with self.condition:
            while (not any(g.queue for g in self.grabbers) and not all(g.finished for g in self.grabbers)
                   and not self.stop.is_set()):
                self.condition.wait(0.1)
            taken = []
            while len(taken) < count and any(g.queue for g in self.grabbers):
                taken += [g.queue.popleft() for g in self.grabbers if g.queue][:count - len(taken)]
            self.condition.notify_all()
            return taken


class LatencyStats:
    """Per-stage latencies of the most recent frames (a fixed-size window, so months of running use
    constant memory) and running totals."""

    def __init__(self, window: int = 10000):
        self.lock = threading.Lock()  # summary() is also called from other threads (MQTT heartbeat, live view)
        self.window = {stage: deque(maxlen=window) for stage in (*STAGES, "total", "frame")}
        self.inference_total_ms = 0.0
        self.frames = self.ng = self.skipped = 0
        self.per_source: dict[str, dict[str, int]] = {}
        self.started = time.perf_counter()

    def _source(self, source: str) -> dict[str, int]:
        return self.per_source.setdefault(source, {"frames": 0, "ng": 0, "skipped": 0})

    def add(self, stages: dict[str, float], verdict: str | None, source: str = "") -> None:
        with self.lock:
            self._add(stages, verdict, source)

    def _add(self, stages: dict[str, float], verdict: str | None, source: str) -> None:
        for stage, value in stages.items():
            self.window[stage].append(value)
        self.window["total"].append(sum(stages.values()))
        self.inference_total_ms += stages["inference"]
        self.frames += 1
        self.ng += verdict == "NG"
        counts = self._source(source)
        counts["frames"] += 1
        counts["ng"] += verdict == "NG"

    def add_skipped(self, source: str = "") -> None:
        """A frame that could not be decoded: logged with its reason, not inspected."""
        with self.lock:
            self.skipped += 1
            self._source(source)["skipped"] += 1

    def add_frame_time(self, ms_per_frame: float, frames: int) -> None:
        """Wall time between consecutive verdicts (the loop's period, waiting for frames included)."""
        with self.lock:
            self.window["frame"].extend([ms_per_frame] * frames)

    def summary(self, dropped: int, reconnects: int, sources: dict[str, dict] | None = None) -> dict:
        """Totals and latency percentiles; `sources` (label → dropped and reconnects) adds per-source counts."""
        with self.lock:
            return self._summary(dropped, reconnects, sources)

    def _summary(self, dropped: int, reconnects: int, sources: dict[str, dict] | None) -> dict:
        elapsed = time.perf_counter() - self.started
        result = {"frames": self.frames, "ng": self.ng, "skipped": self.skipped, "dropped": dropped,
                  "reconnects": reconnects,
                  "seconds": round(elapsed, 2), "fps": round(self.frames / max(elapsed, 1e-9), 2),
                  "wall_share_outside_inference": round(1 - self.inference_total_ms / 1000 / max(elapsed, 1e-9), 3)}
        for stage, values in self.window.items():
            if values:
                p50, p95, p99 = np.percentile(np.fromiter(values, float), [50, 95, 99])
                result[f"{stage}_ms"] = {"p50": round(p50, 2), "p95": round(p95, 2), "p99": round(p99, 2)}
        if "frame_ms" in result and "inference_ms" in result:
            result["outside_inference_share_p50"] = round(
                1 - result["inference_ms"]["p50"] / max(result["frame_ms"]["p50"], 1e-9), 3)
        if sources is not None:
            empty = {"frames": 0, "ng": 0, "skipped": 0}
            result["sources"] = {label: {**self.per_source.get(label, empty), **counters}
                                 for label, counters in sources.items()}
        return result
