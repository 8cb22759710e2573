"""Several cameras on one box: total frames/s of N video sources inspected by one inspect-run process (one
capture thread each, one backend, the newest frames of all sources batched into one inference call) against
N separate inspect-run processes running at the same time, for N = 1, 2, 4. Each source is its own copy of
the soak's line video (512×512 uncompressed frames), played in a loop; every source inspects `--frames`
frames; frames/s = all frames / wall time from launch to the last process's end (start-up included in both).

    python benchmarks/multi_source.py runs/bottle/bundle --data ../shared/data/mvtec_ad/bottle --frames 600
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from soak import make_video

from edgeinspect.runtime.inference.bundle import load_bundle

RUN = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()"]


def run_all(commands: list[list[str]]) -> float:
    """Start every command at once; seconds until the last one ends (each must succeed)."""
    clock = time.perf_counter()
    processes = [subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    for process in processes:
        _, errors = process.communicate()
        if process.returncode:
            raise SystemExit(f"inspect-run failed: {errors[-2000:]}")
    return time.perf_counter() - clock


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--frames", type=int, default=600, help="frames inspected per source")
    parser.add_argument("--counts", default="1,2,4")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/multi_source.json"))
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        make_video(work / "camera0.avi", load_bundle(args.bundle), args.data)
        videos = [work / "camera0.avi"]
        for index in range(1, max(counts)):
            videos.append(shutil.copy(videos[0], work / f"camera{index}.avi"))
        for count in counts:
            base = [str(args.bundle), "--loop", "--save", "none"]
            together = RUN + base + [a for v in videos[:count] for a in ("--source", str(v))] + [
                "--max-frames", str(args.frames * count), "--out", str(work / f"one-{count}")]
            one_s = run_all([together])
            apart_s = run_all([RUN + base + ["--source", str(v), "--max-frames", str(args.frames),
                                             "--out", str(work / f"apart-{count}-{i}")]
                               for i, v in enumerate(videos[:count])])
            summary = json.loads((work / f"one-{count}" / "summary.json").read_text())
            per_source = {label: source["frames"] for label, source in summary["sources"].items()}
            row = {"sources": count, "frames_per_source": args.frames,
                   "one_process_fps": round(args.frames * count / one_s, 1),
                   "separate_processes_fps": round(args.frames * count / apart_s, 1),
                   "ratio": round(apart_s / one_s, 2), "one_process_frames_per_source": per_source,
                   "backend": summary["backend"]}
            results.append(row)
            print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
