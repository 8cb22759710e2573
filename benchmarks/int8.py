"""INT8 against fp32, side by side in one run: every model kind on every data set given, trained and exported
with --int8 through the commands a user runs, then the fp32 and the INT8 model of the same bundle evaluated on
the same test images (image AUROC, pixel AUROC, AUPRO, F1-max) and timed in turns on each CPU backend. With
--profile, OpenVINO's per-layer counters say where a PatchCore frame's time goes at each precision. Rewrites the
INT8 tables of BENCHMARKS.md.

    python benchmarks/int8.py --data ../shared/data/mvtec_ad/bottle --data ../shared/data/magnetic_tile \\
        --data elpv --models patchcore,stpm,dfr,autoencoder --settings 256 --work /tmp/int8 \\
        --train-args 'stpm=--epochs 2' --train-args 'dfr=--epochs 3' --train-args 'autoencoder=--epochs 3'
    python benchmarks/int8.py --data ../shared/data/mvtec_ad/bottle --models patchcore --settings 256,default \\
        --work /tmp/int8 --profile
"""

import argparse
import collections
import functools
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

from datasets import CPU_BACKENDS, SETTINGS, cell
from models import timed, update_benchmarks_md

from edgeinspect.calibration.evaluate import evaluate, predict
from edgeinspect.runtime.commands.bench import interleaved_median_ms
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.inference.backends import model_for, open_backend
from edgeinspect.runtime.inference.bundle import load_bundle

PRECISIONS = ("fp32", "int8")
METRICS = ("image_auroc", "pixel_auroc", "aupro", "f1_max")
TABLES = {"accuracy": ("<!-- int8 table: begin -->", "<!-- int8 table: end -->"),
          "profile": ("<!-- int8 profile table: begin -->", "<!-- int8 profile table: end -->")}


def export_with_int8(kind: str, data: str, run_dir: Path, options: list[str]) -> dict:
    """Train (unless run_dir holds this run already), export with the INT8 model; what the export recorded."""
    if not (run_dir / "run.json").is_file():
        timed(["inspect-train", kind, "--data", data, "--out", run_dir, "--overwrite", *options])
    export_s = timed(["inspect-export", run_dir, "--int8"])
    record = load_bundle(run_dir / "bundle").record
    result = {"export_s": round(export_s, 1), "input": record["input"]["size"], "int8": record["int8"]}
    if not record.get("int8_model_file"):  # the guard refused every try: what the last one measured
        last = record["int8"]["attempts"][-1]
        result["error"] = (f"refused: map correlation {last['map_correlation']:.3f}, score noise "
                           f"{last['score_noise']}σ with {last['float_stages']} stage(s) in float")
    return result


def side_by_side(bundle_dir: Path, data: str, threads: int) -> dict:
    """Metrics of both models on the same test images, and their per-frame times in turns."""
    bundle, dataset = load_bundle(bundle_dir), open_dataset(data)
    metrics = {}
    for precision in PRECISIONS:
        overall = evaluate(bundle, predict(bundle, dataset, precision=precision), dataset.name)["metrics"]["overall"]
        metrics[precision] = {name: overall.get(name) for name in METRICS}
    frame = np.random.default_rng(0).integers(0, 256, (1, *bundle.input_size, 3), dtype=np.uint8)
    calls = {(precision, name): functools.partial(open_backend(bundle, name, threads, precision), frame)
             for precision in PRECISIONS for name in CPU_BACKENDS}
    latency = {f"{name} {precision}": round(ms, 2) for (precision, name), ms in interleaved_median_ms(calls).items()}
    return {"metrics": metrics, "latency_ms": latency}


def layer_group(layer_type: str) -> str:
    if "Convolution" in layer_type:
        return "convolutions"
    if layer_type in ("MatMul", "FullyConnected", "Reduce", "ReduceMin", "ReduceMax"):
        return "projection and bank search (MatMul, Min)"
    if layer_type == "FakeQuantize":
        return "quantize (activations)"
    return "everything else"


def openvino_profile(bundle_dir: Path, threads: int, calls: int = 100) -> dict:
    """OpenVINO's own per-layer times (PERF_COUNT) of one frame, by group of layers, each precision's median over
    `calls` frames; the two compiled models run in turns."""
    import openvino

    from edgeinspect.runtime.inference.backends import openvino_config

    bundle, core = load_bundle(bundle_dir), openvino.Core()
    frame = np.random.default_rng(0).integers(0, 256, (1, *bundle.input_size, 3), dtype=np.uint8)
    requests = {}
    for precision in PRECISIONS:
        model = core.read_model(model_for(bundle, precision))
        model.reshape({model.inputs[0].get_any_name(): list(frame.shape)})
        config = {**openvino_config(threads), "PERF_COUNT": "YES"}
        requests[precision] = core.compile_model(model, "CPU", config).create_infer_request()
    samples = {precision: collections.defaultdict(list) for precision in PRECISIONS}
    for index in range(calls + 10):
        for precision, request in requests.items():
            request.infer({0: frame})
            if index < 10:
                continue
            groups = collections.Counter()
            for layer in request.get_profiling_info():
                groups[layer_group(layer.node_type)] += layer.real_time.total_seconds() * 1000
            for group, ms in groups.items():
                samples[precision][group].append(ms)
            samples[precision]["total (sum of layers)"].append(sum(groups.values()))
    return {precision: {group: round(float(np.median(values)), 2) for group, values in groups.items()}
            for precision, groups in samples.items()}


def accuracy_table(results: list[dict]) -> str:
    head = ["data set", "model", "input", "INT8 convs (float)", "map correlation", *[
        f"{m} fp32 → int8" for m in ("image AUROC", "pixel AUROC", "AUPRO", "F1-max")],
        *[f"{b} ms fp32 → int8" for b in CPU_BACKENDS], "export s"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['data']} | {r['model']} | | {r['error']} |" + " |" * (len(head) - 4))
            continue
        fp32, int8 = r["metrics"]["fp32"], r["metrics"]["int8"]
        guard = r["int8"]["guard"]
        rows.append("| " + " | ".join([
            r["data"], r["model"] + (f" `{' '.join(r['options'])}`" if r["options"] else ""),
            "×".join(map(str, r["input"])), f"{r['int8']['int8_convs']} ({len(r['int8']['float_convs'])})",
            f"{guard['map_correlation']:.3f}",
            *[f"{cell(fp32[m])} → {cell(int8[m])}" for m in METRICS],
            *[f"{r['latency_ms'][f'{b} fp32']:.1f} → {r['latency_ms'][f'{b} int8']:.1f} "
              f"({r['latency_ms'][f'{b} fp32'] / r['latency_ms'][f'{b} int8']:.2f}×)" for b in CPU_BACKENDS],
            f"{r['export_s']:.0f}"]) + " |")
    return "\n".join(rows)


def profile_table(profiles: dict) -> str:
    rows = ["| bundle | layers | fp32 ms | int8 ms | int8 / fp32 |", "| --- | --- | --- | --- | --- |"]
    for label, profile in profiles.items():
        groups = sorted(set(profile["fp32"]) | set(profile["int8"]), key=lambda g: g.startswith("total"))
        for group in groups:
            fp32, int8 = profile["fp32"].get(group, 0.0), profile["int8"].get(group, 0.0)
            rows.append(f"| {label} | {group} | {fp32:.2f} | {int8:.2f} | {int8 / fp32:.2f} |" if fp32 else
                        f"| {label} | {group} | - | {int8:.2f} | - |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", required=True)
    parser.add_argument("--models", default="patchcore")
    parser.add_argument("--settings", default="default", help=f"comma-separated, of {', '.join(SETTINGS)}")
    parser.add_argument("--train-args", action="append", default=[], metavar="KIND=ARGS")
    parser.add_argument("--work", type=Path, default=Path("benchmarks/results/int8-work"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--profile", action="store_true", help="also OpenVINO's per-layer profile of PatchCore")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/int8.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    extra = {kind: value.split() for kind, value in (item.split("=", 1) for item in args.train_args)}
    stored = json.loads(args.out.read_text()) if args.out.is_file() else {"results": [], "profiles": {}}
    for data in args.data:
        name = open_dataset(data).name
        for setting in args.settings.split(","):
            for kind in args.models.split(","):
                options = [*SETTINGS[setting], *extra.get(kind, [])]
                run_dir = args.work / name / f"{kind}-{setting}"
                record = {"data": name, "model": kind, "setting": setting, "options": options}
                try:
                    record |= export_with_int8(kind, data, run_dir, options)
                except subprocess.CalledProcessError:
                    record["error"] = "the export failed (its output says why)"
                if "error" not in record:
                    record |= side_by_side(run_dir / "bundle", data, args.threads)
                    if args.profile and kind == "patchcore":
                        stored["profiles"][f"{name} {'×'.join(map(str, record['input']))}"] = openvino_profile(
                            run_dir / "bundle", args.threads)
                print(json.dumps(record), flush=True)
                stored["results"] = [r for r in stored["results"] if (r["data"], r["model"], r["setting"]) !=
                                     (name, kind, setting)] + [record]
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(stored, indent=2))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, batch 1"
    update_benchmarks_md(args.markdown, *TABLES["accuracy"], f"Generated {time.strftime('%Y-%m-%d')} by "
                         f"`benchmarks/int8.py` (commands above; results in {args.out}) on {machine}; the two "
                         "precisions of a bundle timed in turns.", accuracy_table(stored["results"]))
    if stored["profiles"]:
        update_benchmarks_md(args.markdown, *TABLES["profile"], f"OpenVINO's per-layer counters (PERF_COUNT), median "
                             f"of 100 frames each, the two precisions in turns; {machine}.",
                             profile_table(stored["profiles"]))


if __name__ == "__main__":
    main()
