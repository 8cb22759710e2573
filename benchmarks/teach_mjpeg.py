"""Issue 16's case, answered three ways: a 128×128 PatchCore calibrated on bottle's PNGs, fed the test bottles
through a 128×128 MJPEG video at OpenCV's defaults (every good bottle NG). As it is; recalibrated on 30 held-out
good bottles collected through the same path; taught 10 good test bottles through that path (inspect-teach, no
torch involved). Each is scored on the other 10 good test bottles and the 63 defective ones, through the same
video. Also the time teaching and taking the new version in (load, verify, warm) take. Rewrites the teaching
table of BENCHMARKS.md.

    python benchmarks/teach_mjpeg.py --data ../shared/data/mvtec_ad/bottle --work /tmp/teach-mjpeg
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

import cv2

from models import update_benchmarks_md

from edgeinspect.calibration.teach import teach
from edgeinspect.calibration.thresholds import calibrate
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.hot_swap import HotSwap
from edgeinspect.runtime.inference.inspector import Inspector

TABLE = ("<!-- teach table: begin -->", "<!-- teach table: end -->")
SIZE = 128


def through_mjpeg(paths: list[Path], folder: Path) -> list[Path]:
    """The images as a SIZE×SIZE MJPEG video at OpenCV's defaults, read back frame by frame as lossless PNGs."""
    folder.mkdir(parents=True, exist_ok=True)
    video = folder / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (SIZE, SIZE))
    for path in paths:
        writer.write(cv2.resize(cv2.imread(str(path)), (SIZE, SIZE), interpolation=cv2.INTER_AREA))
    writer.release()
    capture, frames = cv2.VideoCapture(str(video)), []
    for path in paths:
        ok, frame = capture.read()
        assert ok, video
        frames.append(folder / f"{path.parent.name}-{path.name}")
        cv2.imwrite(str(frames[-1]), frame)
    return frames


def ng_counts(bundle_dir: Path, good: list[Path], defective: list[Path]) -> dict:
    bundle = load_bundle(bundle_dir)
    threshold = bundle.thresholds["image"]["threshold"]
    scores = {path: score for path, _, _, score in Inspector(bundle).infer_files(good + defective)}
    return {"good_ng": sum(scores[p] > threshold for p in good), "good": len(good),
            "defective_ng": sum(scores[p] > threshold for p in defective), "defective": len(defective),
            "threshold": round(threshold, 3), "version": (bundle.record.get("version") or {}).get("number", 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/teach-mjpeg"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/teach_mjpeg.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    run = args.work / "run"
    if not (run / "bundle" / "bundle.json").is_file():
        subprocess.run(["inspect-train", "patchcore", "--data", str(args.data), "--image-size", str(SIZE),
                        "--coreset-ratio", "0.01", "--normalization", "imagenet", "--out", str(run), "--overwrite"],
                       check=True)
        subprocess.run(["inspect-export", str(run)], check=True)
    good = sorted((args.data / "test" / "good").glob("*.png"))
    defective = sorted(p for p in (args.data / "test").glob("*/*.png") if p.parent.name != "good")
    frames = through_mjpeg(good + defective, args.work / "frames")
    taught, checked, defective_frames = frames[:10], frames[10:len(good)], frames[len(good):]
    results = {}
    for case in ("as calibrated on PNGs", "recalibrated on 30 collected frames", "taught 10 good frames"):
        bundle_dir = args.work / case.split()[0] / "bundle"
        shutil.rmtree(bundle_dir.parent, ignore_errors=True)
        shutil.copytree(run / "bundle", bundle_dir)
        validation = [Path(p) for p in load_bundle(bundle_dir).record["training"]["validation"]]
        calibrate(load_bundle(bundle_dir), validation)  # on the PNGs, as the line's bundle was
        record = {}
        if case.startswith("recalibrated"):
            collected = through_mjpeg(validation, args.work / "collected")[:30]
            calibrate(load_bundle(bundle_dir), collected, source="30 collected")
        elif case.startswith("taught"):
            running = type("Loop", (), {"inspector": Inspector(load_bundle(bundle_dir)), "seq": 0})()
            clock = time.perf_counter()
            teach(bundle_dir, taught, [], "benchmark")
            record["teach_s"] = round(time.perf_counter() - clock, 1)
            clock = time.perf_counter()
            assert HotSwap(running, bundle_dir, Inspector, lambda message: None).swap()
            record["swap_s"] = round(time.perf_counter() - clock, 2)
            record["entries_added"] = load_bundle(bundle_dir).record["version"]["taught"]["entries_added"]
        results[case] = {**ng_counts(bundle_dir, checked, defective_frames), **record}
        print(case, json.dumps(results[case]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    rows = ["| bundle | threshold | other good bottles NG | defective bottles NG | teaching s | taking it in s |",
            "| --- | --- | --- | --- | --- | --- |"]
    for case, r in results.items():
        rows.append(f"| {case} | {r['threshold']:.2f} | {r['good_ng']} of {r['good']} | {r['defective_ng']} of "
                    f"{r['defective']} | {r.get('teach_s', '-')} | {r.get('swap_s', '-')} |")
    update_benchmarks_md(args.markdown, *TABLE, f"Generated {time.strftime('%Y-%m-%d')} by `python "
                         f"benchmarks/teach_mjpeg.py --data {args.data}` on {platform.machine()}, {os.cpu_count()} "
                         "cores.", "\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
