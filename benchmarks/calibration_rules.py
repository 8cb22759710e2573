"""The calibration rules side by side, through each bundle: thresholds from its held-out good (validation) images
by μ + 3σ, by median + 3·1.4826·MAD and at the 0.99 quantile; at each, the false-alarm rate on the test set's good
images and the recall on its defective ones; and how far from normal the good scores are. Rewrites the
calibration rules table of BENCHMARKS.md.

    python benchmarks/calibration_rules.py --run ../shared/data/mvtec_ad/bottle=runs/bottle/bundle --run elpv=...
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from models import update_benchmarks_md

from edgeinspect.calibration.evaluate import predict
from edgeinspect.calibration.thresholds import RunningMoments, normality, threshold_summary
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.inference.inspector import Inspector

RULES = {"μ + 3σ": ("sigma", 3.0, 0.01), "median + 3·1.4826·MAD": ("robust", 3.0, 0.01),
         "0.99 quantile": ("quantile", 3.0, 0.01)}
TABLE = ("<!-- calibration rules table: begin -->", "<!-- calibration rules table: end -->")


def measure(data: str, bundle_dir: Path) -> dict:
    bundle = load_bundle(bundle_dir)
    validation = [Path(p) for p in bundle.record["training"]["validation"]]
    good_scores = np.array([score for *_, score in Inspector(bundle).infer_files(validation)])
    dataset = open_dataset(data)
    test = predict(bundle, dataset)
    moments = RunningMoments()
    moments.add(good_scores)
    rules = {}
    for name, (method, k, fpr) in RULES.items():
        threshold = threshold_summary(moments, good_scores, method, k, fpr)["threshold"]
        rules[name] = {"threshold": threshold,
                       "false_alarm_rate": float(np.mean(test.scores[~test.labels] > threshold)),
                       "recall": float(np.mean(test.scores[test.labels] > threshold))}
    return {"data": dataset.name, "bundle": str(bundle_dir), "input": bundle.input_size,
            "n_validation": len(good_scores), "n_good_test": int((~test.labels).sum()),
            "n_defective_test": int(test.labels.sum()), "normality": normality(good_scores), "rules": rules}


def table(results: list[dict]) -> str:
    head = ["data set", "input", "good images (validation / test)", "Shapiro-Wilk p, skewness",
            *[f"{rule}: false alarms / recall" for rule in RULES]]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        normal = r["normality"]
        rows.append("| " + " | ".join([
            r["data"], "×".join(map(str, r["input"])), f"{r['n_validation']} / {r['n_good_test']}",
            f"{normal['p']:.2g}, {normal['skewness']:.1f}",
            *[f"{v['false_alarm_rate']:.3f} / {v['recall']:.3f}" for v in r["rules"].values()]]) + " |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, metavar="DATA=BUNDLE",
                        help="a data set (folder or elpv) and a calibrated bundle trained on it (repeat)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/calibration_rules.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    results = [measure(data, Path(bundle)) for data, bundle in (item.split("=", 1) for item in args.run)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    command = "python benchmarks/calibration_rules.py " + " ".join(f"--run {r}" for r in args.run)
    update_benchmarks_md(args.markdown, *TABLE, f"Generated {time.strftime('%Y-%m-%d')} by `{command}` on "
                         f"{platform.machine()}, {os.cpu_count()} cores.", table(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
