"""PatchCore's input normalisation across seeds: ImageNet statistics against the backbone's own, each trained,
exported and evaluated through inspect-train, inspect-export and inspect-eval (the seed moves both the
fit/validation split and the coreset's first centre). Rewrites BENCHMARKS.md's normalisation table.

    python benchmarks/patchcore_normalization.py --data ../shared/data/mvtec_ad/bottle --work /tmp/bench/norm
"""

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

BEGIN, END = "<!-- normalization table: begin -->", "<!-- normalization table: end -->"
CHOICES = ("imagenet", "backbone")
METRICS = ("image_auroc", "pixel_auroc", "aupro")


def evaluate(data: str, run_dir: Path, seed: int, normalization: str) -> dict:
    for command in (["inspect-train", "patchcore", "--data", data, "--out", run_dir, "--seed", seed,
                     "--normalization", normalization],
                    ["inspect-export", run_dir],
                    ["inspect-eval", run_dir / "bundle", "--data", data, "--out", run_dir / "eval.json"]):
        subprocess.run([str(part) for part in command], check=True, stdout=subprocess.DEVNULL)
    overall = json.loads((run_dir / "eval.json").read_text())["metrics"]["overall"]
    return {metric: overall[metric] for metric in METRICS}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/patchcore_normalization.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = {choice: {} for choice in CHOICES}
    for seed in seeds:
        for choice in CHOICES:
            results[choice][seed] = evaluate(args.data, args.work / f"{choice}-{seed}", seed, choice)
            print(choice, seed, json.dumps(results[choice][seed]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))

    lines = [f"Generated {time.strftime('%Y-%m-%d')} by `python benchmarks/patchcore_normalization.py --data {args.data} "
             f"--work {args.work} --seeds {args.seeds}` (ONNX bundles through inspect-eval, CPU).", "",
             "| normalisation | " + " | ".join(f"seed {s}: image AUROC / pixel AUROC / AUPRO" for s in seeds)
             + " | mean AUPRO | min AUPRO |",
             "| --- |" + " --- |" * (len(seeds) + 2)]
    for choice in CHOICES:
        rows = results[choice]
        cells = [f"{rows[s]['image_auroc']:.3f} / {rows[s]['pixel_auroc']:.4f} / {rows[s]['aupro']:.4f}" for s in seeds]
        aupros = [rows[s]["aupro"] for s in seeds]
        lines.append(f"| {choice} | " + " | ".join(cells) + f" | {statistics.mean(aupros):.4f} | {min(aupros):.4f} |")
    text = args.markdown.read_text()
    start, end = text.index(BEGIN), text.index(END)
    args.markdown.write_text(text[:start] + BEGIN + "\n" + "\n".join(lines) + "\n" + text[end:])


if __name__ == "__main__":
    main()
