"""The frame loop of inspect-run: the frames the grabbers took, from every source, are resized and go through one
inference call; each gets its verdict, regions and one record, handed to the sinks in order, with per-stage latency
and a summary at the end."""

import threading
import time
from collections import deque
from datetime import datetime, timezone

import numpy as np

from edgeinspect.runtime.capture.grabbers import Frame, Grabbers
from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.inference.inspector import Inspector
from edgeinspect.runtime.outputs.sinks import Inspected, Sinks

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

    def restart(self) -> None:
        """Start the clock of frames/s now, as the frames start to come."""
        with self.lock:
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


class FrameLoop:
    """Resize → one inference call for the frames taken (of every source) → one record per frame, in order,
    handed to the sinks. `seq` numbers the records of the run (skipped frames too), so a consumer can tell
    a gap from a duplicate. `inspector` may be replaced from another thread (a new bundle version): each batch
    is scored by the one it started with."""

    def __init__(self, inspector: Inspector, sinks: Sinks, stats: LatencyStats, run_id: str):
        self.inspector, self.sinks, self.stats, self.run_id = inspector, sinks, stats, run_id
        self.seq = 0
        self.last_done: float | None = None

    def _record(self, frame: Frame) -> dict:
        record = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), "run": self.run_id,
                  "seq": self.seq, "frame": frame.index, "name": frame.name, "source": frame.source}
        self.seq += 1
        return record

    def inspect(self, taken: list[Frame]) -> None:
        inspector = self.inspector
        readable = [frame for frame in taken if frame.rgb is not None]
        outcomes = iter(())
        if readable:
            clock = time.perf_counter()
            prepared = np.stack([inspector.prepare(frame.rgb) for frame in readable])
            preprocess_ms = (time.perf_counter() - clock) * 1000 / len(readable)
            clock = time.perf_counter()
            maps, scores = inspector.infer(prepared)
            inference_ms = (time.perf_counter() - clock) * 1000 / len(readable)
            outcomes = zip(maps, scores)
        for frame in taken:
            record = self._record(frame)
            if frame.rgb is None:
                record["skipped"] = frame.error
                self.stats.add_skipped(frame.source)
                self.sinks.handle(Inspected(record))
                continue
            anomaly_map, score = next(outcomes)
            clock = time.perf_counter()
            inspection = inspector.judge(float(score), anomaly_map)
            record.update(score=round(inspection.score, 5), threshold=inspector.image_threshold,
                          verdict=inspection.verdict, regions=[r.to_dict() for r in inspection.regions],
                          version=inspector.version)
            stages = {"capture": frame.capture_ms, "preprocess": preprocess_ms, "inference": inference_ms,
                      "postprocess": (time.perf_counter() - clock) * 1000}
            record["latency_ms"] = {stage: round(value, 2) for stage, value in stages.items()}
            clock = time.perf_counter()
            self.sinks.handle(Inspected(record, frame.rgb, inspection.anomaly_map, inspector.pixel_threshold))
            self.stats.add({**stages, "output": (time.perf_counter() - clock) * 1000}, inspection.verdict,
                           frame.source)
        done = time.perf_counter()
        if self.last_done is not None and readable:
            self.stats.add_frame_time((done - self.last_done) * 1000 / len(readable), len(readable))
        self.last_done = done


def inspect_until_done(grabbers: Grabbers, frame_loop: FrameLoop, stop: threading.Event, count: int,
                       max_frames: int, alive=lambda: None) -> None:
    """Take up to `count` frames at a time and inspect them, until the sources end, a signal or --max-frames.
    `alive()` is called after each inference call and while waiting for frames: it stops when the loop is stuck."""
    stats = frame_loop.stats
    while not stop.is_set():
        taken = grabbers.take(count, waiting=alive)
        if not taken:
            return
        if max_frames:
            taken = taken[:max_frames - stats.frames - stats.skipped]
        frame_loop.inspect(taken)
        alive()
        if max_frames and stats.frames + stats.skipped >= max_frames:
            return
