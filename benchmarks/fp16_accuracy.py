"""How much fp16 moves each model's accuracy: every trained run in --work evaluated on the test set in
PyTorch on the CPU, once in fp32 and once with the fp16-tolerant modules (those an fp16 TensorRT engine
runs in fp16) in half precision, the rest in fp32 as the engine's pinned layers. Rewrites BENCHMARKS.md's
fp16 table.

    python benchmarks/fp16_accuracy.py --data ../shared/data/mvtec_ad/bottle --work /tmp/bench
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgeinspect.calibration.evaluate import evaluate, predict
from edgeinspect.export.half_precision import with_half_precision
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.train.registry import MODEL_KINDS
from edgeinspect.train.run import load_run

BEGIN, END = "<!-- fp16 table: begin -->", "<!-- fp16 table: end -->"


def torch_backend(model):
    """The PyTorch model with a runtime backend's contract: uint8 (B, H, W, 3) → maps (B, H, W), scores (B,)."""
    def infer(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            maps, scores = model(torch.from_numpy(images))
        return maps[:, 0].numpy(), scores.numpy()
    return infer


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", type=Path, required=True, help="folder with one run folder per model kind")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fp16.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    dataset = open_dataset(args.data)
    results = []
    for kind in MODEL_KINDS:
        if not (args.work / kind / "bundle" / "bundle.json").is_file():
            continue
        model, run = load_run(args.work / kind)
        bundle = load_bundle(args.work / kind / "bundle")
        row = {"model": kind}
        for precision, variant in (("fp32", model), ("fp16", with_half_precision(model))):
            clock = time.perf_counter()
            predictions = predict(bundle, dataset, backend=torch_backend(variant))
            overall = evaluate(bundle, predictions, dataset.name)
            overall = overall["metrics"]["overall"]
            row[precision] = {"image_auroc": overall["image_auroc"], "pixel_auroc": overall.get("pixel_auroc"),
                              "seconds": round(time.perf_counter() - clock, 1)}
        row["delta_image_auroc"] = row["fp16"]["image_auroc"] - row["fp32"]["image_auroc"]
        if row["fp32"]["pixel_auroc"] is not None:
            row["delta_pixel_auroc"] = row["fp16"]["pixel_auroc"] - row["fp32"]["pixel_auroc"]
        results.append(row)
        print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    lines = [f"Generated {time.strftime('%Y-%m-%d')} by `python benchmarks/fp16_accuracy.py --data {args.data} "
             f"--work {args.work}` (PyTorch on the CPU; fp16 where the engine would use it).", "",
             "| model | image AUROC fp32 | fp16 | Δ | pixel AUROC fp32 | fp16 | Δ | within 0.005 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        deltas = [abs(r["delta_image_auroc"]), abs(r.get("delta_pixel_auroc", 0.0))]
        lines.append(f"| {r['model']} | {r['fp32']['image_auroc']:.4f} | {r['fp16']['image_auroc']:.4f} | "
                     f"{r['delta_image_auroc']:+.4f} | {r['fp32']['pixel_auroc']:.4f} | {r['fp16']['pixel_auroc']:.4f} "
                     f"| {r.get('delta_pixel_auroc', 0.0):+.4f} | {'yes' if max(deltas) <= 0.005 else 'no'} |")
    text = args.markdown.read_text()
    start, end = text.index(BEGIN), text.index(END)
    args.markdown.write_text(text[:start] + BEGIN + "\n" + "\n".join(lines) + "\n" + text[end:])


if __name__ == "__main__":
    main()
