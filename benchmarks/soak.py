"""A long run of inspect-run on a looping video: resident memory after warm-up vs at the end, whether every
frame got its JSON line (across rotated logs, in order), and with --max-disk the largest size the run folder
reached. The video is made of the bundle's held-out good images and a few defective ones (about one NG frame
in ten), at 512×512.

    python benchmarks/soak.py runs/bottle/bundle --data ../shared/data/mvtec_ad/bottle --frames 10000
    python benchmarks/soak.py runs/bottle/bundle --data … --frames 10000 --save all --max-disk 50MB
"""

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.inference.images import read_image, resize

WARMUP_FRAMES = 500


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def make_video(path: Path, bundle, data: str) -> int:
    good = [Path(p) for p in bundle.record["training"]["validation"]]
    defective = [s.path for s in open_dataset(data).test if s.label][:len(good) // 9]
    # uncompressed frames, as a raw industrial camera delivers them: lossless (MJPEG at OpenCV's default quality
    # alone lifts good bottle scores over the threshold) and cheap to decode (FFV1 costs ~10 ms a frame here)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"RGBA"), 30, (512, 512))
    for image_path in good + defective:
        writer.write(cv2.cvtColor(resize(read_image(image_path), (512, 512)), cv2.COLOR_RGB2BGR))
    writer.release()
    return len(good) + len(defective)


def line_count(path: Path) -> int:
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        return sum(1 for _ in f)


def folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.rglob("*"):
        try:
            total += path.stat().st_size if path.is_file() else 0
        except FileNotFoundError:  # deleted by the retention meanwhile
            pass
    return total


def logged_sequence(out: Path) -> list[int]:
    """seq of every JSON line, rotated logs (plain or gzipped, oldest first) then the current one."""
    paths = sorted(out.glob("inspections-*.jsonl*")) + [out / "inspections.jsonl"]
    records = [json.loads(line) for path in paths
               for line in (gzip.open(path) if path.suffix == ".gz" else open(path, "rb")).read().splitlines()]
    return [record["seq"] for record in records if "alarm" not in record]  # alarm lines carry no seq


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", required=True)
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/soak.json"))
    parser.add_argument("--video", type=Path, help="write the line video here and keep it (for inspect-bench "
                                                   "--video); default: a temporary file")
    parser.add_argument("--save", default="ng", choices=("ng", "all", "none"))
    parser.add_argument("--max-disk", help="inspect-run's --max-disk (e.g. 50MB)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        video = args.video or work / "line.avi"
        clip_frames = make_video(video, load_bundle(args.bundle), args.data)
        command = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()", str(args.bundle),
                   "--source", str(video), "--loop", "--max-frames", str(args.frames),
                   "--out", str(work / "out"), "--save", args.save] + (["--max-disk", args.max_disk] if args.max_disk else [])
        errors = open(work / "stderr.txt", "w")  # a file, not a pipe: an unread pipe would block the run
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
        log = work / "out" / "inspections.jsonl"
        samples, after_warmup, largest = [], None, 0
        while process.poll() is None:
            time.sleep(1.0)
            try:
                memory = rss_mb(process.pid)
            except FileNotFoundError:
                break
            if not memory:  # exiting
                continue
            frames = line_count(log)
            largest = max(largest, folder_bytes(work / "out"))
            samples.append((frames, memory))
            if after_warmup is None and frames >= WARMUP_FRAMES:
                after_warmup = memory
        errors.close()
        stderr = (work / "stderr.txt").read_text()
        sequence = logged_sequence(work / "out")
        largest = max(largest, folder_bytes(work / "out"))
        summary = json.loads((work / "out" / "summary.json").read_text())
    later = [memory for frames, memory in samples if frames >= WARMUP_FRAMES]
    result = {
        "frames_asked": args.frames, "json_lines": len(sequence), "summary_frames": summary["frames"],
        "lines_in_order_without_gap": sequence == list(range(len(sequence))), "save": args.save,
        "max_disk": args.max_disk, "folder_max_bytes": largest, "deleted_files": summary.get("deleted_files"),
        "video_frames": clip_frames, "backend": summary["backend"], "rss_after_warmup_mb": round(after_warmup or 0, 1),
        "rss_max_after_warmup_mb": round(max(later or [0]), 1), "rss_end_mb": round(samples[-1][1], 1),
        "growth_mb": round(max(later or [0]) - (after_warmup or 0), 1), "fps": summary["fps"],
        "ng": summary["ng"], "exit_code": process.returncode, "total_ms": summary.get("total_ms"),
    }
    if process.returncode:
        print(stderr[-2000:], file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
