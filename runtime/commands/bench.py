"""inspect-bench: how fast a bundle runs here. Per backend that opens on this machine: latency per frame at
batch 1 and throughput at a larger batch, on synthetic frames; then the whole inspect-run pipeline
(capture thread, resize, inference, verdict, regions, log, NG overlays) on a video, with the share of the
frame time spent outside inference."""

import functools
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import typer
from rich.table import Table

from edgeinspect.runtime.capture.grabbers import Grabber
from edgeinspect.runtime.capture.sources import open_source
from edgeinspect.runtime.console import InspectError, command_app, console, one_line_errors
from edgeinspect.runtime.files import writable_file_parent
from edgeinspect.runtime.frame_loop import FrameLoop, LatencyStats, check_batch_and_threads
from edgeinspect.runtime.inference.backends import BACKENDS, BackendUnavailable, open_backend
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.inspector import Inspector
from edgeinspect.runtime.outputs.out_folder import new_run_id
from edgeinspect.runtime.outputs.overlays import OverlayStore
from edgeinspect.runtime.outputs.run_log import JsonLog
from edgeinspect.runtime.outputs.sinks import Sinks

app = command_app()


def call_times_ms(call, runs: int, warmup: int) -> list[float]:
    """ms of each of `runs` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        clock = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - clock))
    return times


def median_ms(call, runs: int, warmup: int = 5) -> float:
    return statistics.median(call_times_ms(call, runs, warmup))


def interleaved_median_ms(calls: dict, rounds: int = 5, runs: int = 10, warmup: int = 3, settle: int = 20) -> dict:
    """Median ms per call of each named callable, measured in turns (rounds × runs each, after a warm-up in every
    turn), so that a shared machine's slow and fast spells fall on all of them alike. Each is first called
    `settle` times: PyTorch eager takes tens of calls to reach its steady speed (its allocations settle)."""
    for call in calls.values():
        call_times_ms(call, 0, settle)
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            times[name] += call_times_ms(call, runs, warmup)
    return {name: statistics.median(values) for name, values in times.items()}


def synthetic_video(path: Path, frames: int, size: tuple[int, int]) -> Path:
    """A camera-like video: a textured scene drifting a little, with sensor noise."""
    rng = np.random.default_rng(0)
    height, width = size
    scene = cv2.GaussianBlur(rng.integers(0, 256, (height + 40, width + 40, 3), dtype=np.uint8), (0, 0), 3)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (width, height))
    for index in range(frames):
        dy, dx = index % 20, (index // 2) % 20
        frame = scene[dy:dy + height, dx:dx + width].astype(np.int16) + rng.integers(-4, 5, (height, width, 3))
        writer.write(np.clip(frame, 0, 255).astype(np.uint8))
    writer.release()
    return path


# What the live page does, in its own process as a browser is (a thread of ours would take the frame loop's
# GIL): /stats.json twice a second, the live picture once a second, each new NG frame; counts on SIGINT.
BROWSER = r"""
import json, signal, sys, time, urllib.request
url, counts, frame, seen, fetched = sys.argv[1], {"polls": 0, "images": 0, "errors": 0}, None, set(), 0.0
signal.signal(signal.SIGINT, lambda *_: (print(json.dumps(counts), flush=True), sys.exit(0)))
def get(path):
    with urllib.request.urlopen(url + path.lstrip("/"), timeout=10) as response:
        return response.read()
while True:
    time.sleep(0.5)
    try:
        stats = json.loads(get("/stats.json"))
        counts["polls"] += 1
        for source in stats["sources"][:1]:
            if source["frame"] and source["frame"] != frame and time.monotonic() - fetched >= 0.95:
                frame, fetched = source["frame"], time.monotonic()
                get(f"/frame/{source['index']}.jpg?v={frame}")
                counts["images"] += 1
        for ng in stats["ng_frames"]:
            if ng["id"] not in seen:
                seen.add(ng["id"])
                get(f"/ng/{ng['id']}.jpg")
                counts["images"] += 1
    except OSError:
        counts["errors"] += 1
"""


def pipeline(bundle_dir: Path, video: Path, frames: int, backend: str, threads: int | None, out: Path,
             view: bool = False, precision: str = "auto") -> dict:
    """inspect-run's loop on `frames` frames of the video played in a loop (mode every, NG overlays saved,
    the JSON log written), without console output. `view`: with the live page and its health alarms, as
    `inspect-run --view` has them, and one client polling the page as a browser does."""

    bundle = load_bundle(bundle_dir)
    inspector = Inspector(bundle, backend, threads, precision)
    source = open_source(str(video), loop=True)
    stop = threading.Event()
    grabber = Grabber(source, "every", stop, label=str(video))
    stats = LatencyStats()
    run_id = new_run_id()
    sinks = Sinks([OverlayStore(out, "ng", run_id), JsonLog(out)])
    if view:
        from edgeinspect.runtime.outputs.health import Health, HealthSink
        from edgeinspect.runtime.outputs.live_view import LiveView, LiveViewSink, about_run

        health = Health(bundle.thresholds, bundle_dir, out, [grabber], "every")
        live_view = LiveView("127.0.0.1", 0)
        sinks.sinks.append(LiveViewSink(live_view, lambda: stats.summary(grabber.dropped, 0), stats, [grabber], health,
                                        about_run(bundle_dir, bundle, inspector.backend.name, run_id, "every")))
        sinks.sinks.append(HealthSink(health))  # alarms kept for the page, not said on the console
        browser = subprocess.Popen([sys.executable, "-c", BROWSER, live_view.url], stdout=subprocess.PIPE, text=True)
    loop = FrameLoop(inspector, sinks, stats, run_id)
    grabber.start()
    while stats.frames < frames and (taken := grabber.take(1)):
        loop.inspect(taken)
    stop.set()
    grabber.join()
    sinks.close()
    summary = stats.summary(grabber.dropped, 0)
    summary["backend"] = inspector.backend.name
    if view:
        browser.send_signal(signal.SIGINT)
        summary["view"] = json.loads(browser.communicate(timeout=30)[0] or '{"errors": "the client died"}')
    return summary


@app.command()
@one_line_errors
def bench(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by inspect-export."),
    video: Path = typer.Option(None, "--video", help="Video for the whole-pipeline run, played in a loop "
                               "(default: a synthetic 640×480 one)."),
    frames: int = typer.Option(300, "--frames", help="Frames the whole-pipeline run inspects."),
    batch: int = typer.Option(8, "--batch", help="Batch size for the throughput measurement."),
    runs: int = typer.Option(50, "--runs", help="Timed runs per measurement (median reported; at batch 1 the "
                             "backends take turns, 5 rounds)."),
    backend: str = typer.Option("auto", "--backend", help="Backend of the whole-pipeline run."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for inference (default: all cores)."),
    out: Path = typer.Option(None, "--out", help="Also write the results as JSON here."),
    view: bool = typer.Option(False, "--view", help="Serve the live page during the pipeline run, with one client "
                              "polling it as a browser does (compare with a run without, for the page's cost)."),
    precision: str = typer.Option("auto", "--precision", help="Model of the whole-pipeline run: fp32 or int8 (auto: "
                                  "what the thresholds were calibrated for)."),
):
    """Latency and throughput per backend on synthetic frames, and the whole pipeline on a video."""
    for value, option in ((frames, "--frames"), (runs, "--runs")):
        if value < 1:
            raise InspectError(f"{option} must be at least 1, got {value}")
    check_batch_and_threads(batch, threads)
    if backend != "auto" and backend not in BACKENDS:
        raise InspectError(f"--backend {backend!r} is not one of auto, {', '.join(BACKENDS)}")
    if video is not None and not video.is_file():
        raise InspectError(f"--video {video}: no such file")
    if out is not None:
        out = writable_file_parent(out, "--out")
    bundle = load_bundle(bundle_dir)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, *bundle.input_size, 3), dtype=np.uint8)
    table = Table("backend", "ms/frame (batch 1)", f"frames/s (batch {batch})", title=f"{bundle_dir} on this machine")
    results, opened = {"backends": {}}, {}
    precisions = ["fp32"] + (["int8"] if bundle.record.get("int8_model_file") else [])
    runs_of = {name if model == "fp32" else f"{name} int8": (name, model) for model in precisions for name in BACKENDS}
    labels = list(runs_of)
    for label, (name, model) in runs_of.items():  # every backend at every precision the bundle has, in turns
        try:
            opened[label] = open_backend(bundle, name, threads, model)
        except BackendUnavailable as reason:
            results["backends"][label] = {"unavailable": str(reason)}
    singles = interleaved_median_ms({name: functools.partial(backend, images[:1]) for name, backend in opened.items()},
                                    runs=max(1, runs // 5))
    for name in labels:
        if name in opened:
            batched = median_ms(functools.partial(opened[name], images), max(5, runs // 5))
            results["backends"][name] = {"ms_per_frame_batch1": round(singles[name], 2),
                                         "frames_per_s_batched": round(1000 * batch / batched, 1)}
            table.add_row(name, f"{singles[name]:.2f}", f"{1000 * batch / batched:.1f}")
        else:
            table.add_row(name, "unavailable", results["backends"][name]["unavailable"][:60])
    console.print(table)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        clip = video or synthetic_video(work / "line.avi", min(frames, 100), (480, 640))
        summary = pipeline(bundle_dir, clip, frames, backend, threads, work, view, precision)
    alone = results["backends"][summary["backend"]].get("ms_per_frame_batch1")
    if alone:  # the strictest view: what the pipeline adds to inference running alone, contention included
        summary["outside_inference_alone_share_p50"] = round(1 - alone / summary["frame_ms"]["p50"], 3)
    results["pipeline"] = summary
    clip_name = clip.name if video else "a synthetic 640×480 video"
    stages = Table("stage", "p50 ms", "p95 ms", "p99 ms",
                   title=f"inspect-run pipeline on {clip_name} ({summary['backend']})")
    for stage in ("capture", "preprocess", "inference", "postprocess", "total", "frame"):
        values = summary[f"{stage}_ms"]
        stages.add_row(stage, f"{values['p50']:.2f}", f"{values['p95']:.2f}", f"{values['p99']:.2f}")
    console.print(stages)
    strict = summary.get("outside_inference_alone_share_p50")
    if view:
        console.print(f"live page served meanwhile: {summary['view']['polls']} polls of /stats.json, "
                      f"{summary['view']['images']} images fetched, {summary['view']['errors']} errors")
    console.print(f"{summary['frames']} frames at {summary['fps']:.1f} frames/s; outside inference: "
                  f"{100 * summary['outside_inference_share_p50']:.1f}% of the p50 frame time (the time between "
                  f"verdicts), {100 * summary['wall_share_outside_inference']:.1f}% of the wall time"
                  + (f"; {100 * strict:.1f}% of it beyond inference run alone" if strict is not None else ""))
    if out is not None:
        out.write_text(json.dumps(results, indent=2))


def main():
    app()
