"""Every model kind on one data set, end to end through the commands a user runs: inspect-train,
inspect-export, inspect-calibrate and inspect-eval; then parity of each CPU backend with PyTorch on every test
image, per-frame latency on each available backend and in PyTorch eager mode, and the bundle size. Writes a JSON
record and rewrites the generated table of BENCHMARKS.md.

    python benchmarks/models.py --data ../shared/data/mvtec_ad/bottle --work /tmp/bench
"""

import argparse
import functools
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from edgeinspect.export.onnx_export import parity
from edgeinspect.runtime.inference.backends import BACKENDS, BackendUnavailable, open_backend
from edgeinspect.runtime.commands.bench import interleaved_median_ms
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.inference.images import load_resized
from edgeinspect.train.registry import MODEL_KINDS
from edgeinspect.train.run import load_run

TABLE_BEGIN, TABLE_END = "<!-- models table: begin -->", "<!-- models table: end -->"


def timed(command: list) -> float:
    clock = time.perf_counter()
    subprocess.run([str(part) for part in command], check=True)
    return time.perf_counter() - clock


def parity_on_test_images(model, bundle, paths: list[Path]) -> dict:
    """Worst |backend − PyTorch| over maps and scores, relative to each batch's map range, for each CPU
    backend that opens here."""
    worst = {}
    for name in ("openvino", "ort-cpu"):
        try:
            backend = open_backend(bundle, name)
        except BackendUnavailable:
            continue
        worst[name] = max(parity(model, backend, load_resized(paths[i:i + 8], bundle.input_size)[0])["relative_diff"]
                          for i in range(0, len(paths), 8))
    return worst


def latencies(model, bundle, threads: int) -> dict:
    """Median ms per 1-image batch: each backend that can open here, and the same model in PyTorch eager,
    measured in turns (side by side)."""
    frame = np.random.default_rng(0).integers(0, 256, (1, *bundle.input_size, 3), dtype=np.uint8)
    result, calls = {}, {}
    for name in BACKENDS:
        try:
            backend = open_backend(bundle, name, threads)
        except Exception as error:  # a backend whose library or device is missing here
            result[name] = f"unavailable: {error}"
            continue
        calls[name] = functools.partial(backend, frame)
    torch.set_num_threads(threads)
    with torch.inference_mode():
        calls["pytorch-eager"] = functools.partial(model, torch.from_numpy(frame))
        result.update({name: round(ms, 2) for name, ms in interleaved_median_ms(calls).items()})
    return result


def benchmark(kind: str, data: str, work: Path, threads: int, extra: list[str], reuse_run: bool) -> dict:
    run_dir = work / kind
    if reuse_run and (run_dir / "run.json").is_file():
        train_s = json.loads((run_dir / "run.json").read_text())["timings"]["total_s"]
    else:
        train_s = timed(["inspect-train", kind, "--data", data, "--out", run_dir, *extra])
    export_s = timed(["inspect-export", run_dir])
    timed(["inspect-calibrate", run_dir / "bundle"])
    timed(["inspect-eval", run_dir / "bundle", "--data", data, "--out", work / f"{kind}-eval.json"])
    overall = json.loads((work / f"{kind}-eval.json").read_text())["metrics"]["overall"]
    model, run = load_run(run_dir)
    bundle = load_bundle(run_dir / "bundle")
    result = {
        "model": kind, "train_args": extra, "train_s": round(train_s, 1), "export_s": round(export_s, 1),
        "run": {k: run[k] for k in ("config", "timings", "memory_bank", "training") if k in run},
        "metrics": {k: overall[k] for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max") if k in overall},
        "at_threshold": overall.get("at_threshold"),
        "thresholds": bundle.thresholds,
        "parity_worst": parity_on_test_images(model, bundle, [s.path for s in open_dataset(data).test]),
        "latency_ms": latencies(model, bundle, threads),
        "bundle_mb": round(sum(f["bytes"] for f in bundle.record["files"].values()) / 1e6, 1),
    }
    if "training" in run:
        result["run"]["training"].pop("history")
    return result


def speed_up(latency_ms: dict) -> float:
    """PyTorch eager's time over the fastest backend's, from the same side-by-side measurement."""
    fastest = min(v for k, v in latency_ms.items() if k != "pytorch-eager" and isinstance(v, float))
    return latency_ms["pytorch-eager"] / fastest


def markdown_table(results: list[dict]) -> str:
    backends = [b for b in BACKENDS if any(isinstance(r["latency_ms"].get(b), float) for r in results)]
    head = ["model", "image AUROC", "pixel AUROC", "AUPRO", "F1-max", "at μ+3σ: precision / recall",
            "train s (epochs)", "export s", *[f"{b} ms/frame" for b in backends], "PyTorch eager ms/frame",
            "eager ÷ fastest", "bundle MB"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        m, at, training = r["metrics"], r["at_threshold"] or {}, r["run"].get("training")
        epochs = f" ({training['epochs_run']}, best {training['best_epoch']})" if training else ""
        latency = [f"{r['latency_ms'][b]:.1f}" if isinstance(r["latency_ms"].get(b), float) else "n/a"
                   for b in backends]
        rows.append("| " + " | ".join([
            " ".join([r["model"], *r["train_args"]]), f"{m['image_auroc']:.3f}", f"{m.get('pixel_auroc', float('nan')):.4f}",
            f"{m.get('aupro', float('nan')):.3f}", f"{m['f1_max']:.3f}",
            f"{at.get('precision', float('nan')):.3f} / {at.get('recall', float('nan')):.3f}",
            f"{r['train_s']:.0f}{epochs}", f"{r['export_s']:.0f}", *latency,
            f"{r['latency_ms']['pytorch-eager']:.1f}", f"{speed_up(r['latency_ms']):.1f}×",
            f"{r['bundle_mb']:.1f}",
        ]) + " |")
    return "\n".join(rows)


def update_benchmarks_md(path: Path, begin: str, end: str, header: str, table: str) -> None:
    """Replace the generated block between the markers `begin` and `end`."""
    text = path.read_text()
    block = f"{begin}\n{header}\n\n{table}\n{end}"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no generated-table markers {begin} … {end}")
    path.write_text(pattern.sub(lambda _: block, text))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/work"))
    parser.add_argument("--models", default=",".join(MODEL_KINDS), help="comma-separated model kinds")
    parser.add_argument("--train-args", action="append", default=[], metavar="KIND=ARGS",
                        help='extra inspect-train options for one kind, e.g. stpm="--epochs 30"')
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/models.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from the --out JSON")
    parser.add_argument("--reuse-runs", default="", metavar="KINDS",
                        help="comma-separated kinds whose run folder in --work is exported, calibrated and "
                             "evaluated again without training (train s is then the one recorded in run.json)")
    args = parser.parse_args()
    extra = {kind: value.split() for kind, value in (item.split("=", 1) for item in args.train_args)}
    kinds = args.models.split(",")
    unknown = set(kinds) - set(MODEL_KINDS)
    if unknown:
        raise SystemExit(f"--models: unknown kind(s) {', '.join(sorted(unknown))}")
    # results of kinds not run this time are kept, so one kind can be re-measured alone
    previous = json.loads(args.out.read_text()) if args.out.is_file() else []
    results = {r["model"]: r for r in previous if r["model"] in MODEL_KINDS}
    for kind in [] if args.table_only else kinds:
        results[kind] = benchmark(kind, args.data, args.work, args.threads, extra.get(kind, []),
                                  kind in args.reuse_runs.split(","))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps([results[k] for k in MODEL_KINDS if k in results], indent=2))
    results = [results[k] for k in MODEL_KINDS if k in results]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    reused = f" --reuse-runs {args.reuse_runs}" if args.reuse_runs else ""
    command = f"python benchmarks/models.py --data {args.data} --work {args.work}{reused}"
    header = (f"Generated {time.strftime('%Y-%m-%d')} by `{command}` on {machine} (options other than the "
              f"defaults are shown after the model); latency: batch 1, {args.threads} threads, each backend and "
              f"PyTorch eager called 20 times to settle, then timed in turns (5 rounds of 10 calls each); "
              f"medians. \"eager ÷ fastest\" is PyTorch eager's time over the fastest backend's.")
    update_benchmarks_md(args.markdown, TABLE_BEGIN, TABLE_END, header, markdown_table(results))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
