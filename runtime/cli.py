"""inspect-run: inspect every frame of a camera, video, stream or image folder with a calibrated bundle."""

import json
import time
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path

import cv2
import typer
from rich.markup import escape

from .bundle import load_bundle
from .console import InspectError, console, one_line_errors, warn
from .files import atomic_write_bytes
from .inspector import Inspector
from .regions import heat_overlay
from .sources import open_frames

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class Save(str, Enum):
    ng = "ng"
    all = "all"
    none = "none"


@app.command()
@one_line_errors
def run(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by inspect-export (and calibrated)."),
    source: str = typer.Option(None, "--source", help="Image folder, video file, stream URL, camera index, or elpv (its held-out test cells)."),
    camera: int = typer.Option(None, "--camera", help="Camera index (OpenCV / V4L2), short for --source N."),
    out: Path = typer.Option(Path("out"), "--out", help="Folder for inspections.jsonl and the overlay images."),
    save: Save = typer.Option(Save.ng, "--save", help="Which frames to save with the heat-map overlay."),
    max_frames: int = typer.Option(0, "--max-frames", help="Stop after this many frames (0: until the source ends)."),
    backend: str = typer.Option("auto", "--backend", help="Inference backend: auto or ort-cpu."),
    threads: int = typer.Option(None, "--threads", help="CPU threads for inference (default: all cores)."),
):
    """Score every frame, give an OK/NG verdict against the calibrated threshold, log one JSON line per frame
    and save NG frames with the anomaly heat map and the regions above the pixel threshold outlined."""
    if (source is None) == (camera is None):
        raise InspectError("give exactly one of --source and --camera")
    source = str(camera) if camera is not None else source
    bundle = load_bundle(bundle_dir)
    if bundle.thresholds is None:
        warn(f"{bundle_dir} is not calibrated: scores only, no verdicts (run inspect-calibrate)")
    inspector = Inspector(bundle, backend, threads)
    chosen = inspector.backend
    console.print(escape(f"backend {chosen.name}" + "".join(f"; not {name}: {why}"
                                                            for name, why in chosen.passed_over.items())))
    frames = open_frames(source)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"frames": 0, "NG": 0}
    started = time.perf_counter()
    with open(out / "inspections.jsonl", "a") as log:
        for name, frame in frames:
            clock = time.perf_counter()
            inspection = inspector.inspect(inspector.prepare(frame)[None])[0]
            latency_ms = (time.perf_counter() - clock) * 1000
            record = {
                "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                "frame": counts["frames"], "name": name, "source": source,
                "score": round(inspection.score, 5), "threshold": inspector.image_threshold,
                "verdict": inspection.verdict, "regions": [r.to_dict() for r in inspection.regions],
                "latency_ms": round(latency_ms, 2),
            }
            if save == Save.all or (save == Save.ng and inspection.verdict == "NG"):
                overlay = heat_overlay(frame, inspection.anomaly_map, inspector.pixel_threshold)
                image_path = out / f"{Path(name).stem}_{counts['frames']:06d}.png"
                atomic_write_bytes(image_path, cv2.imencode(".png", overlay)[1].tobytes())
                record["overlay"] = str(image_path)
            log.write(json.dumps(record) + "\n")
            log.flush()
            counts["frames"] += 1
            counts["NG"] += inspection.verdict == "NG"
            console.print(f"{name}: {inspection.verdict or '-'} score {inspection.score:.3f}"
                          + (f" → {record['overlay']}" if "overlay" in record else ""))
            if max_frames and counts["frames"] >= max_frames:
                break
    elapsed = time.perf_counter() - started
    console.print(f"{counts['frames']} frames, {counts['NG']} NG, {counts['frames'] / max(elapsed, 1e-9):.1f} "
                  f"frames/s; log: {out / 'inspections.jsonl'}")


def main():
    app()
