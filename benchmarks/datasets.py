"""Every model kind on every data set given, at the default settings and at the high-resolution setting, end to
end through the commands a user runs (inspect-train, inspect-export, inspect-calibrate, inspect-eval); plus the
cost of PatchCore's input size: fit time and per-frame time at several sizes, measured side by side. Rewrites
the two generated tables of BENCHMARKS.md.

    python benchmarks/datasets.py --data ../shared/data/mvtec_ad/bottle --data ../shared/data/magnetic_tile \\
        --data elpv --work /tmp/datasets --cost-data ../shared/data/mvtec_ad/bottle
"""

import argparse
import functools
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from models import timed, update_benchmarks_md

from edgeinspect.runtime.inference.backends import open_backend
from edgeinspect.runtime.commands.bench import interleaved_median_ms
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.train.registry import MODEL_KINDS

# default: the input chosen from the data (--image-size auto); 256: the fixed input of before
SETTINGS = {"default": [], "256": ["--image-size", "256"], "high-res": ["--image-size", "512"]}
COST_SIZES = ("256", "384", "512", "256x640")
TILES = "512 as 4 tiles of 256"
CPU_BACKENDS = ("openvino", "ort-cpu")
TABLES = {"datasets": ("<!-- datasets table: begin -->", "<!-- datasets table: end -->"),
          "cost": ("<!-- cost table: begin -->", "<!-- cost table: end -->")}


def train_and_evaluate(kind: str, data: str, run_dir: Path, options: list[str]) -> dict:
    """One model through train, export, calibrate and eval; the record of what it measured."""
    train_s = timed(["inspect-train", kind, "--data", data, "--out", run_dir, "--overwrite", *options])
    export_s = timed(["inspect-export", run_dir])
    timed(["inspect-calibrate", run_dir / "bundle"])
    timed(["inspect-eval", run_dir / "bundle", "--data", data, "--out", run_dir / "eval.json"])
    overall = json.loads((run_dir / "eval.json").read_text())["metrics"]["overall"]
    run = json.loads((run_dir / "run.json").read_text())
    return {"model": kind, "options": options, "input": run["config"]["image_size"],
            "train_s": round(train_s, 1), "export_s": round(export_s, 1),
            "metrics": {k: overall.get(k) for k in ("image_auroc", "pixel_auroc", "aupro", "f1_max")},
            "at_threshold": overall.get("at_threshold"), "bank": run.get("memory_bank"),
            "config": run["config"], "n_fit": run["data"]["n_fit"]}


def backend_latencies(bundles: dict[str, Path], threads: int, batches: dict[str, int] | None = None
                      ) -> dict[str, dict[str, float]]:
    """Median ms per call of each bundle on each CPU backend (a 1-image batch, or `batches[label]` images), all
    measured in turns in one run."""
    calls = {}
    for label, path in bundles.items():
        bundle = load_bundle(path)
        batch = (batches or {}).get(label, 1)
        frame = np.random.default_rng(0).integers(0, 256, (batch, *bundle.input_size, 3), dtype=np.uint8)
        for name in CPU_BACKENDS:
            try:
                calls[(label, name)] = functools.partial(open_backend(bundle, name, threads), frame)
            except Exception:  # a backend whose library is missing here
                continue
    medians = interleaved_median_ms(calls)
    result = {label: {} for label in bundles}
    for (label, name), ms in medians.items():
        result[label][name] = round(ms, 2)
    return result


def cell(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def datasets_table(results: list[dict]) -> str:
    head = ["data set", "model", "setting", "input", "image AUROC", "pixel AUROC", "AUPRO", "F1-max",
            "at μ+3σ: precision / recall", "fit s (train + export)", *[f"{b} ms/frame" for b in CPU_BACKENDS],
            "bank entries"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        m, at = r["metrics"], r["at_threshold"] or {}
        extra = " ".join(r["options"][len(SETTINGS[r["setting"]]):])
        rows.append("| " + " | ".join([
            r["data"], r["model"] + (f" `{extra}`" if extra else ""), r["setting"],
            "×".join(map(str, r["input"])) if r.get("input") else "256×256" if r["setting"] == "default" else "512×512",
            cell(m["image_auroc"]),
            cell(m["pixel_auroc"]), cell(m["aupro"]), cell(m["f1_max"]),
            f"{cell(at.get('precision'))} / {cell(at.get('recall'))}", f"{r['train_s'] + r['export_s']:.0f}",
            *[cell(r["latency_ms"].get(b), 1) for b in CPU_BACKENDS],
            str(r["bank"]["entries"]) if r.get("bank") else "-"]) + " |")
    return "\n".join(rows)


def cost_table(results: list[dict], tiles_ms: dict) -> str:
    base = results[0]
    head = ["input size", "patches fitted", "bank entries", "fit s (train + export)",
            *[f"{b} ms/frame (× {base['size']})" for b in CPU_BACKENDS], "image AUROC", "pixel AUROC", "AUPRO"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        latency = [f"{r['latency_ms'][b]:.1f} ({r['latency_ms'][b] / base['latency_ms'][b]:.2f}×)"
                   if b in r["latency_ms"] else "n/a" for b in CPU_BACKENDS]
        m = r["metrics"]
        rows.append("| " + " | ".join([r["size"], str(r["bank"]["patches"]), str(r["bank"]["entries"]),
                                       f"{r['train_s'] + r['export_s']:.0f}", *latency, cell(m["image_auroc"]),
                                       cell(m["pixel_auroc"]), cell(m["aupro"])]) + " |")
    tiles = [f"{tiles_ms[b]:.1f} ({tiles_ms[b] / base['latency_ms'][b]:.2f}×)" if b in tiles_ms else "n/a"
             for b in CPU_BACKENDS]
    rows.append("| " + " | ".join([f"{TILES} (one batch)", "-", "-", "-", *tiles, "-", "-", "-"]) + " |")
    return "\n".join(rows)


def measure_datasets(args, record: dict, kinds: list[str], settings: list[str], extra: dict) -> None:
    for data in args.data:
        name = open_dataset(data).name
        runs = []
        for setting in settings:
            for kind in kinds:
                run_dir = args.work / name / setting / kind
                result = train_and_evaluate(kind, data, run_dir, SETTINGS[setting] + extra.get(kind, []))
                runs.append({"data": name, "setting": setting, **result})
        time_datasets(args, runs)
        measured = {(r["data"], r["setting"], r["model"]) for r in runs}
        record["datasets"] = [r for r in record["datasets"]
                              if (r["data"], r["setting"], r["model"]) not in measured] + runs
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2))


def time_datasets(args, rows: list[dict]) -> None:
    """Latency of each row's bundle, every kind and setting of one data set in turns."""
    for data in sorted({r["data"] for r in rows}):
        members = [r for r in rows if r["data"] == data]
        bundles = {(r["setting"], r["model"]): args.work / data / r["setting"] / r["model"] / "bundle"
                   for r in members}
        latencies = backend_latencies(bundles, args.threads)
        for r in members:
            r["latency_ms"] = latencies[(r["setting"], r["model"])]


def measure_cost(args, record: dict) -> None:
    record["cost"] = []
    for size in COST_SIZES:
        result = train_and_evaluate("patchcore", args.cost_data, args.work / "cost" / size, ["--image-size", size])
        record["cost"].append({"size": size, **result})
    time_cost(args, record)
    args.out.write_text(json.dumps(record, indent=2))


def time_cost(args, record: dict) -> None:
    """Every size's bundle in turns, and, for tiling instead, a 512×512 frame as four 256×256 tiles in one batch
    through the 256×256 bundle."""
    bundles = {r["size"]: args.work / "cost" / r["size"] / "bundle" for r in record["cost"]}
    bundles[TILES] = bundles["256"]
    latencies = backend_latencies(bundles, args.threads, batches={TILES: 4})
    for result in record["cost"]:
        result["latency_ms"] = latencies[result["size"]]
    record["tiles_latency_ms"] = latencies[TILES]


def write_tables(args, record: dict) -> None:
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    stamp = f"Latency measured {record['timed']} on {machine}, {args.threads} threads, batch 1"
    if record["datasets"]:
        commands = "; ".join(f"`{c}`" for c in record["commands"])
        update_benchmarks_md(args.markdown, *TABLES["datasets"], f"Generated by {commands}. {stamp}; every kind and setting of "
                             "one data set timed in turns.", datasets_table(record["datasets"]))
    if record["cost"]:
        update_benchmarks_md(args.markdown, *TABLES["cost"],
                             f"Generated by `python benchmarks/datasets.py --cost-data {record['cost_data']}`, PatchCore "
                             f"at its defaults but for the size. {stamp}; every size's bundle timed in turns.",
                             cost_table(record["cost"], record["tiles_latency_ms"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", default=[], help="a data set folder or elpv (repeat)")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/datasets"))
    parser.add_argument("--models", default=",".join(MODEL_KINDS), help="comma-separated model kinds")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--train-args", action="append", default=[], metavar="KIND=ARGS",
                        help='extra inspect-train options for one kind, e.g. stpm="--epochs 5"')
    parser.add_argument("--cost-data", help="data set for the PatchCore cost table (sizes " + ", ".join(COST_SIZES) + ")")
    parser.add_argument("--retime", action="store_true",
                        help="only time every bundle of --out again (on a quiet machine) and rewrite the tables")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/datasets.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    extra = {kind: value.split() for kind, value in (item.split("=", 1) for item in args.train_args)}
    kinds, settings = args.models.split(","), args.settings.split(",")
    if set(kinds) - set(MODEL_KINDS) or set(settings) - set(SETTINGS):
        raise SystemExit(f"--models must be among {', '.join(MODEL_KINDS)}; --settings among {', '.join(SETTINGS)}")
    # rows not measured this time are kept, so one kind, data set or setting can be re-measured alone
    record = {"datasets": [], "cost": [], "commands": [],
              **(json.loads(args.out.read_text()) if args.out.is_file() else {})}
    if args.retime:
        time_datasets(args, record["datasets"])
        if record["cost"]:
            time_cost(args, record)
    if args.data:
        measure_datasets(args, record, kinds, settings, extra)
        record["commands"].append(" ".join(["python benchmarks/datasets.py", *[f"--data {d}" for d in args.data],
                                            f"--models {args.models} --settings {args.settings}",
                                            *[f"--train-args '{t}'" for t in args.train_args]]))
    if args.cost_data:
        record["cost_data"] = args.cost_data
        measure_cost(args, record)
    record["timed"] = time.strftime("%Y-%m-%d")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    write_tables(args, record)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
