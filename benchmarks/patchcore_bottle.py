"""PatchCore on an MVTec AD category, end to end through the commands a user runs:
wall time of inspect-train + inspect-export, accuracy through inspect-eval on the bundle, ONNX Runtime vs
PyTorch parity on every test image, and the greedy coreset time at a 10% ratio.

    python benchmarks/patchcore_bottle.py --data ../shared/data/mvtec_ad/bottle --work /tmp/bench
"""

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from edgeinspect.runtime.backends import OrtCpuBackend
from edgeinspect.runtime.bundle import load_bundle
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.images import load_resized
from edgeinspect.train.patchcore import PatchCoreConfig, extract_patches, greedy_coreset, random_projection
from edgeinspect.train.run import load_run


def timed(command: list[str]) -> float:
    clock = time.perf_counter()
    subprocess.run(command, check=True)
    return time.perf_counter() - clock


def parity_on_test_images(run_dir: Path, dataset, size) -> dict:
    model, _ = load_run(run_dir)
    backend = OrtCpuBackend(load_bundle(run_dir / "bundle"))
    worst = 0.0
    paths = [s.path for s in dataset.test]
    for start in range(0, len(paths), 8):
        images, _ = load_resized(paths[start:start + 8], size)
        with torch.inference_mode():
            torch_maps, torch_scores = model(torch.from_numpy(images))
        ort_maps, ort_scores = backend(images)
        map_range = float(torch_maps.max() - torch_maps.min())
        diff = max(np.abs(ort_maps - torch_maps[:, 0].numpy()).max(), np.abs(ort_scores - torch_scores.numpy()).max())
        worst = max(worst, float(diff) / map_range)
    return {"images": len(paths), "worst_relative_diff": worst}


def coreset_seconds(run_dir: Path, ratio: float) -> dict:
    model, run = load_run(run_dir)
    config = PatchCoreConfig.from_dict(run["config"])
    images, _ = load_resized([Path(p) for p in run["data"]["fit"]], config.image_size)
    patches = extract_patches(model, images)
    clock = time.perf_counter()
    projected = random_projection(patches, config.projection_dim, config.seed)
    greedy_coreset(projected, round(ratio * len(patches)), config.seed)
    return {"ratio": ratio, "patches": len(patches), "seconds": round(time.perf_counter() - clock, 1)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/work"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/patchcore.json"))
    args = parser.parse_args()
    run_dir = args.work / "patchcore"
    train_s = timed(["inspect-train", "patchcore", "--data", args.data, "--out", str(run_dir)])
    export_s = timed(["inspect-export", str(run_dir)])
    timed(["inspect-calibrate", str(run_dir / "bundle")])
    timed(["inspect-eval", str(run_dir / "bundle"), "--data", args.data, "--out", str(args.work / "eval.json")])
    metrics = json.loads((args.work / "eval.json").read_text())["metrics"]["overall"]
    run = json.loads((run_dir / "run.json").read_text())
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, {platform.processor() or 'cpu'}",
        "train_s": round(train_s, 1), "export_s": round(export_s, 1), "train_plus_export_s": round(train_s + export_s, 1),
        "train_timings": run["timings"], "memory_bank": run["memory_bank"],
        "metrics": {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")},
        "at_threshold": metrics.get("at_threshold"),
        "parity": parity_on_test_images(run_dir, open_dataset(args.data), tuple(run["config"]["image_size"])),
        "coreset_10_percent": coreset_seconds(run_dir, 0.1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
