"""inspect-run: inspect every frame of a camera, video, stream or image folder with a calibrated bundle."""

import json
import signal
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import cv2
import numpy as np
import typer
from rich.markup import escape

from .bundle import load_bundle
from .console import InspectError, console, one_line_errors, warn
from .files import atomic_write_bytes, atomic_write_json
from .frame_loop import Frame, Grabber, LatencyStats
from .inspector import Inspector
from .live_view import LiveView
from .regions import heat_overlay
from .sources import open_source

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class Save(str, Enum):
    ng = "ng"
    all = "all"
    none = "none"


class Mode(str, Enum):
    auto = "auto"
    latest = "latest"
    every = "every"


@contextmanager
def stop_on_signals(stop: threading.Event):
    """SIGINT and SIGTERM end the run cleanly (the summary is still written)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command()
@one_line_errors
def run(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by inspect-export (and calibrated)."),
    source: str = typer.Option(None, "--source", help="Image folder, video file, stream URL (rtsp://, http://), "
                               "camera index, GStreamer pipeline (contains '!'), or elpv (its held-out test cells)."),
    camera: int = typer.Option(None, "--camera", help="Camera index (OpenCV / V4L2), short for --source N."),
    out: Path = typer.Option(Path("out"), "--out", help="Folder for inspections.jsonl, summary.json and overlays."),
    save: Save = typer.Option(Save.ng, "--save", help="Which frames to save with the heat-map overlay."),
    mode: Mode = typer.Option(Mode.auto, "--mode", help="latest: newest frame only, count the skipped ones "
                              "(default for cameras and streams); every: each frame in order (default for files)."),
    batch: int = typer.Option(1, "--batch", help="Frames per inference call (mode every)."),
    watch: bool = typer.Option(False, "--watch", help="Keep watching an image folder for new files."),
    loop: bool = typer.Option(False, "--loop", help="Play a video file again from the start when it ends."),
    max_frames: int = typer.Option(0, "--max-frames", help="Stop after this many frames (0: until the source ends "
                                   "or SIGINT/SIGTERM)."),
    view: int = typer.Option(None, "--view", help="Serve the annotated stream and statistics on this HTTP port "
                             "(a page at /, MJPEG at /stream.mjpg); 0 picks a free port."),
    view_host: str = typer.Option("127.0.0.1", "--view-host", help="Address the live view listens on (0.0.0.0 "
                                  "to reach it from another machine)."),
    backend: str = typer.Option("auto", "--backend", help="auto, tensorrt, ort-tensorrt, ort-cuda, openvino or ort-cpu."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for inference (default: all cores)."),
):
    """Score every frame, give an OK/NG verdict against the calibrated threshold, log one JSON line per frame
    and save NG frames with the anomaly heat map and the regions above the pixel threshold outlined."""
    if (source is None) == (camera is None):
        raise InspectError("give exactly one of --source and --camera")
    if batch < 1:
        raise InspectError(f"--batch must be at least 1, got {batch}")
    source = str(camera) if camera is not None else source
    bundle = load_bundle(bundle_dir)
    if bundle.thresholds is None:
        warn(f"{bundle_dir} is not calibrated: scores only, no verdicts (run inspect-calibrate)")
    inspector = Inspector(bundle, backend, threads)
    chosen = inspector.backend
    console.print(escape(f"backend {chosen.name}" + "".join(f"; not {name}: {why}"
                                                            for name, why in chosen.passed_over.items())))
    frames = open_source(source, watch, loop)
    mode = (Mode.latest if frames.live else Mode.every) if mode == Mode.auto else mode
    out.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    grabber = Grabber(frames, mode.value, stop, queue_size=max(8, 2 * batch))
    stats = LatencyStats()
    live_view = LiveView(view_host, view) if view is not None else None
    if live_view is not None:
        console.print(f"live view on {live_view.url}")
    with stop_on_signals(stop), open(out / "inspections.jsonl", "a") as log:
        loop = FrameLoop(inspector, source, save, out, log, stats, verbose=None if frames.live else True,
                         view=live_view, counters=lambda: (grabber.dropped, frames.reconnects))
        grabber.start()
        try:
            while not stop.is_set():
                taken = grabber.take(batch if mode == Mode.every else 1)
                if not taken:
                    break
                if max_frames:
                    taken = taken[:max_frames - stats.frames]
                loop.inspect(taken)
                if max_frames and stats.frames >= max_frames:
                    break
        finally:
            stop.set()
            grabber.join(timeout=5)
            if live_view is not None:
                live_view.close()
    if grabber.error is not None and not isinstance(grabber.error, KeyboardInterrupt):
        raise grabber.error
    summary = {**stats.summary(grabber.dropped, frames.reconnects), "backend": chosen.name}
    atomic_write_json(out / "summary.json", summary)
    total = summary.get("total_ms", {})
    console.print(f"{summary['frames']} frames, {summary['ng']} NG, {summary['dropped']} dropped, "
                  f"{summary['reconnects']} reconnects, {summary['fps']:.1f} frames/s; latency p50 "
                  f"{total.get('p50', 0):.1f} ms, p95 {total.get('p95', 0):.1f} ms, p99 {total.get('p99', 0):.1f} ms; "
                  f"log: {out / 'inspections.jsonl'}")


class FrameLoop:
    """Resize → one inference call → per frame: verdict, regions, overlay, one flushed JSON line, and the
    live view's picture when it is on."""

    VIEW_INTERVAL_S = 0.1  # at most 10 annotated frames per second for the live view

    def __init__(self, inspector: Inspector, source: str, save: Save, out: Path, log, stats: LatencyStats,
                 verbose: bool | None, view: LiveView | None, counters):
        """verbose: True prints every frame, None only NG frames, False nothing; counters() gives the
        dropped frames and reconnects so far, for the live view."""
        self.inspector, self.source, self.save, self.out, self.log = inspector, source, save, out, log
        self.stats, self.verbose, self.view, self.counters = stats, verbose, view, counters
        self.last_view = 0.0
        self.last_done: float | None = None

    def inspect(self, taken: list[Frame]) -> None:
        inspector = self.inspector
        clock = time.perf_counter()
        prepared = np.stack([inspector.prepare(frame.rgb) for frame in taken])
        preprocess_ms = (time.perf_counter() - clock) * 1000 / len(taken)
        clock = time.perf_counter()
        maps, scores = inspector.infer(prepared)
        inference_ms = (time.perf_counter() - clock) * 1000 / len(taken)
        for frame, anomaly_map, score in zip(taken, maps, scores):
            clock = time.perf_counter()
            inspection = inspector.judge(float(score), anomaly_map)
            record = {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "frame": frame.index, "name": frame.name, "source": self.source,
                "score": round(inspection.score, 5), "threshold": inspector.image_threshold,
                "verdict": inspection.verdict, "regions": [r.to_dict() for r in inspection.regions],
            }
            overlay = None
            if self.save == Save.all or (self.save == Save.ng and inspection.verdict == "NG"):
                overlay = heat_overlay(frame.rgb, inspection.anomaly_map, inspector.pixel_threshold)
                image_path = self.out / f"{Path(frame.name).stem}_{frame.index:06d}.jpg"
                atomic_write_bytes(image_path, cv2.imencode(".jpg", overlay, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
                record["overlay"] = str(image_path)
            stages = {"capture": frame.capture_ms, "preprocess": preprocess_ms, "inference": inference_ms,
                      "postprocess": (time.perf_counter() - clock) * 1000}
            record["latency_ms"] = {stage: round(value, 2) for stage, value in stages.items()}
            self.log.write(json.dumps(record) + "\n")
            self.log.flush()
            self.stats.add(stages, inspection.verdict)
            self._publish(frame, inspection, overlay)
            if self.verbose is True or (self.verbose is None and inspection.verdict == "NG"):
                console.print(f"{frame.name}: {inspection.verdict or '-'} score {inspection.score:.3f}"
                              + (f" → {record['overlay']}" if "overlay" in record else ""))
        done = time.perf_counter()
        if self.last_done is not None:
            self.stats.add_frame_time((done - self.last_done) * 1000 / len(taken), len(taken))
        self.last_done = done

    def _publish(self, frame: Frame, inspection, overlay) -> None:
        if self.view is None or time.perf_counter() - self.last_view < self.VIEW_INTERVAL_S:
            return
        self.last_view = time.perf_counter()
        if overlay is None:
            overlay = heat_overlay(frame.rgb, inspection.anomaly_map, self.inspector.pixel_threshold)
        stats = self.stats.summary(*self.counters())
        stats["last"] = {"name": frame.name, "verdict": inspection.verdict or "-", "score": round(inspection.score, 4)}
        self.view.publish(cv2.imencode(".jpg", overlay)[1].tobytes(), stats)


def main():
    app()
