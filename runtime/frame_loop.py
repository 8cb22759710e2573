"""The frame loop of inspect-run: capture in its own thread (never waiting on inference), then resize →
inference → verdict, regions, log line and overlay, with per-stage latency and a summary at the end.

`every` processes each frame in order (files, folders); `latest` processes the newest frame and counts the
ones it skipped (cameras: the verdict is about now, not about a backlog)."""

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from .sources import FrameSource

STAGES = ("capture", "preprocess", "inference", "postprocess")


@dataclass
class Frame:
    index: int
    name: str
    rgb: np.ndarray
    capture_ms: float


class Grabber(threading.Thread):
    """Reads the source into a bounded queue (`every`: back-pressure, nothing lost) or a one-frame slot
    (`latest`: a newer frame replaces an unprocessed one, which counts as dropped)."""

    def __init__(self, source: FrameSource, mode: str, stop: threading.Event, queue_size: int = 8):
        super().__init__(name="frame-grabber", daemon=True)
        self.source, self.mode, self.stop = source, mode, stop
        self.queue: deque[Frame] = deque()
        self.queue_size = queue_size
        self.condition = threading.Condition()
        self.finished = False
        self.dropped = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            index, clock = 0, time.perf_counter()
            for name, rgb in self.source.frames(self.stop):
                frame = Frame(index, name, rgb, (time.perf_counter() - clock) * 1000)
                index += 1
                self._put(frame)
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
        with self.condition:
            while not self.queue and not self.finished and not self.stop.is_set():
                self.condition.wait(0.1)
            taken = [self.queue.popleft() for _ in range(min(count, len(self.queue)))]
            self.condition.notify_all()
            return taken


class LatencyStats:
    """Per-stage latencies of the most recent frames (a fixed-size window, so months of running use
    constant memory) and running totals."""

    def __init__(self, window: int = 10000):
        self.window = {stage: deque(maxlen=window) for stage in (*STAGES, "total", "frame")}
        self.inference_total_ms = 0.0
        self.frames = self.ng = 0
        self.started = time.perf_counter()

    def add(self, stages: dict[str, float], verdict: str | None) -> None:
        for stage, value in stages.items():
            self.window[stage].append(value)
        self.window["total"].append(sum(stages.values()))
        self.inference_total_ms += stages["inference"]
        self.frames += 1
        self.ng += verdict == "NG"

    def add_frame_time(self, ms_per_frame: float, frames: int) -> None:
        """Wall time between consecutive verdicts (the loop's period, waiting for frames included)."""
        self.window["frame"].extend([ms_per_frame] * frames)

    def summary(self, dropped: int, reconnects: int) -> dict:
        elapsed = time.perf_counter() - self.started
        result = {"frames": self.frames, "ng": self.ng, "dropped": dropped, "reconnects": reconnects,
                  "seconds": round(elapsed, 2), "fps": round(self.frames / max(elapsed, 1e-9), 2),
                  "wall_share_outside_inference": round(1 - self.inference_total_ms / 1000 / max(elapsed, 1e-9), 3)}
        for stage, values in self.window.items():
            if values:
                p50, p95, p99 = np.percentile(np.fromiter(values, float), [50, 95, 99])
                result[f"{stage}_ms"] = {"p50": round(p50, 2), "p95": round(p95, 2), "p99": round(p99, 2)}
        if "frame_ms" in result and "inference_ms" in result:
            result["outside_inference_share_p50"] = round(
                1 - result["inference_ms"]["p50"] / max(result["frame_ms"]["p50"], 1e-9), 3)
        return result
