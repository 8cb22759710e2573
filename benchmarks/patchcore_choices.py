"""PatchCore's choices measured on several data sets in PyTorch (no export): backbone, stages, input size,
input normalisation, aspect ratio (stretch or letterbox), the principal components kept, the bank's size and the
coreset selection (pooled, or the exact greedy loop). Used to pick the defaults; the defaults themselves are then measured through the
exported bundle by benchmarks/datasets.py.

Each setting is one argument of comma-separated key=value pairs over the defaults, e.g.

    python benchmarks/patchcore_choices.py --data ../shared/data/magnetic_tile --data elpv \\
        "" "backbone=tf_efficientnet_lite1" "strides=8-16-32" "size=384x384" "resize=letterbox"

Appends one JSON line per (data set, setting) to --out: image AUROC (overall and per defect type), pixel
AUROC (inside the image, not the letterbox's padding), AUPRO (stretched inputs), fit seconds, bank size, and
PyTorch's median ms per 1-image batch on this machine. `--markdown BENCHMARKS.md` rewrites its choices table
from every line of --out.
"""

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from unittest import mock

import cv2
import numpy as np
import torch

from models import update_benchmarks_md

from edgeinspect.calibration.metrics import aupro, auroc
from edgeinspect.runtime.console import progress_bar
from edgeinspect.runtime.datasets import open_dataset, split_fit_validation
from edgeinspect.runtime.inference.images import read_image, resize
from edgeinspect.train import patchcore
from edgeinspect.train.patchcore import PatchCoreConfig

KEYS = {"coreset": str, "backbone": str, "strides": lambda v: tuple(int(s) for s in v.split("-")),
        "size": lambda v: tuple(int(s) for s in v.split("x")), "normalization": str, "ratio": float,
        "max_entries": int, "resize": str, "dim": int, "sigma": float, "image_score": str, "patch_stride": int}
FIELDS = {"size": "image_size", "ratio": "coreset_ratio", "max_entries": "coreset_max_entries", "dim": "feature_dim"}


def parse_setting(text: str) -> tuple[dict, str, str]:
    values = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=", 1)
        values[key] = KEYS[key](value)
    return values, values.pop("resize", "stretch"), values.pop("coreset", "pooled")


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resized to fit inside `size` with its aspect ratio kept, centred on black; (top, left, height, width) of
    the image inside."""
    height, width = size
    scale = min(height / image.shape[0], width / image.shape[1])
    inner = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    top, left = (height - inner[0]) // 2, (width - inner[1]) // 2
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    canvas[top:top + inner[0], left:left + inner[1]] = resize(image, inner)
    return canvas, (top, left, *inner)


def prepared(path: Path, size: tuple[int, int], mode: str):
    """(the image at the input size, the box (top, left, height, width) that shows it)."""
    image = read_image(path)
    if mode == "letterbox":
        return letterbox(image, size)
    return resize(image, size), (0, 0, *size)


def mask_in_box(mask_path: Path | None, box, size) -> tuple[np.ndarray, np.ndarray]:
    """Ground truth and the pixels that show the image, both at the input size (nearest-neighbour)."""
    top, left, height, width = box
    inside = np.zeros(size, dtype=bool)
    inside[top:top + height, left:left + width] = True
    truth = np.zeros(size, dtype=bool)
    if mask_path is not None:
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        truth[top:top + height, left:left + width] = cv2.resize(mask, (width, height),
                                                                interpolation=cv2.INTER_NEAREST_EXACT) > 0
    return truth, inside


def measure(data: str, setting: str, threads: int) -> dict:
    overrides, mode, coreset = parse_setting(setting)
    config = PatchCoreConfig(**{FIELDS.get(k, k): v for k, v in overrides.items()})
    size = config.image_size
    dataset = open_dataset(data)
    fit_paths, _ = split_fit_validation(dataset.good, 0.2, config.seed)
    fit_images = np.stack([prepared(p, size, mode)[0] for p in fit_paths])
    torch.set_num_threads(threads)
    clock = time.perf_counter()
    # coreset=exact: today's selection replaced by the exact greedy loop over every patch, for comparison
    selection = {"pooled": patchcore.pooled_greedy_coreset, "exact": patchcore.greedy_coreset}[coreset]
    with progress_bar() as bar, torch.inference_mode(), mock.patch.object(patchcore, "pooled_greedy_coreset", selection):
        model, _, details = patchcore.fit_patchcore(config, fit_images, fit_images[:1], None, bar, None)
    fit_s = time.perf_counter() - clock
    scores, maps, truths, labels, whole_maps, whole_truths = [], [], [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(dataset.test), 16):
            samples = dataset.test[start:start + 16]
            batch = [prepared(s.path, size, mode) for s in samples]
            anomaly_maps, batch_scores = model(torch.from_numpy(np.stack([b[0] for b in batch])))
            scores += batch_scores.tolist()
            labels += [s.label for s in samples]
            for sample, (_, box), anomaly_map in zip(samples, batch, anomaly_maps[:, 0].numpy()):
                truth, inside = mask_in_box(sample.mask, box, size)
                maps.append(anomaly_map[inside])
                truths.append(truth[inside])
                if mode == "stretch":
                    whole_maps.append(anomaly_map)
                    whole_truths.append(truth)
        frame = torch.from_numpy(fit_images[:1])
        for _ in range(3):
            model(frame)
        times = []
        for _ in range(10):
            clock = time.perf_counter()
            model(frame)
            times.append(time.perf_counter() - clock)
    pixel = auroc(np.concatenate(truths), np.concatenate(maps)) if dataset.has_masks else None
    pro = aupro(np.stack(whole_maps), np.stack(whole_truths)) if dataset.has_masks and whole_maps else None
    types, scores = np.array([s.defect_type for s in dataset.test]), np.array(scores)
    per_type = {t: round(auroc(types[(types == t) | (types == "good")] == t, scores[(types == t) | (types == "good")]), 4)
                for t in sorted(set(types) - {"good"})}
    return {"data": dataset.name, "setting": setting or "defaults", "resize": mode, "coreset": coreset,
            "aupro": None if pro is None else round(pro, 4),
            "config": dataclasses.asdict(config), "image_auroc": round(auroc(np.array(labels), scores), 4),
            "image_auroc_per_type": per_type,
            "pixel_auroc": None if pixel is None else round(pixel, 4), "fit_s": round(fit_s, 1),
            "bank": details["memory_bank"], "torch_ms_per_frame": round(1000 * float(np.median(times)), 1)}


def table_markers(name: str) -> tuple[str, str]:
    return f"<!-- {name} table: begin -->", f"<!-- {name} table: end -->"


def choices_table(results: list[dict]) -> str:
    head = ["data set", "change over the defaults", "backbone", "stages (strides)", "input", "normalisation", "aspect", "coreset",
            "bank dim (channels or components)", "bank entries", "image AUROC", "pixel AUROC", "AUPRO", "image AUROC per defect type", "fit s"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        c = r["config"]
        per_type = ", ".join(f"{t} {v:.3f}" for t, v in r.get("image_auroc_per_type", {}).items()) or "-"
        rows.append("| " + " | ".join([
            r["data"], f"`{r['setting']}`" if r["setting"] != "defaults" else "none", c["backbone"].replace("tf_efficientnet_", ""), "-".join(map(str, c["strides"])),
            "×".join(map(str, c["image_size"])), c["normalization"], r["resize"], r.get("coreset", "pooled"),
            str(r["bank"]["dim"]), str(r["bank"]["entries"]), f"{r['image_auroc']:.3f}",
            *["-" if r.get(k) is None else f"{r[k]:.3f}" for k in ("pixel_auroc", "aupro")], per_type,
            f"{r['fit_s']:.0f}"]) + " |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="*", help='comma-separated key=value over the defaults ("" = defaults)')
    parser.add_argument("--data", action="append", default=[])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/patchcore_choices.jsonl"))
    parser.add_argument("--markdown", type=Path, help="rewrite this file's choices table from every line of --out")
    parser.add_argument("--table", default="choices", help="which generated table of --markdown (its markers' name)")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for data in args.data:
        for setting in args.settings:
            result = measure(data, setting, args.threads)
            print(json.dumps(result), flush=True)
            with args.out.open("a") as out:
                out.write(json.dumps(result) + "\n")
    if args.markdown:
        results = [json.loads(line) for line in args.out.read_text().splitlines()]
        update_benchmarks_md(args.markdown, *table_markers(args.table), f"Generated {time.strftime('%Y-%m-%d')} from {args.out.name} "
                             "(PyTorch, this machine's 2 cores; fit s is indicative: most runs shared the machine, "
                             "so per-frame times are in the tables measured alone).", choices_table(results))


if __name__ == "__main__":
    main()
