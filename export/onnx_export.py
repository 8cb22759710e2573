"""One export entry point. The graph takes uint8 RGB images (B, H, W, 3) with a dynamic batch and returns
``anomaly_map`` (B, 1, H, W) and ``score`` (B,); normalisation and the memory bank live inside it."""

import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch
from rich.markup import escape

import edgeinspect
from edgeinspect.runtime.backends import OrtCpuBackend
from edgeinspect.runtime.bundle import BUNDLE_FORMAT_VERSION, Bundle, file_digests, load_bundle
from edgeinspect.runtime.console import InspectError, console, warn
from edgeinspect.runtime.files import replace_dir
from edgeinspect.runtime.images import load_resized
from edgeinspect.train.run import load_run

from .precision import convert_fp16, fp32_nodes, onnx_scopes
from .static_padding import with_static_padding
from .tensorrt_check import check_tensorrt
from .tensorrt_engine import ENGINE_FILE, TIMING_CACHE_FILE, build_engine, tensorrt_unavailable

INPUT_NAME = "images"
OUTPUT_NAMES = ["anomaly_map", "score"]
MODEL_FILE = "model.onnx"
FP16_MODEL_FILE = "model_fp16.onnx"
PARITY_TOLERANCE = 1e-4  # of the anomaly map's value range


@dataclass(frozen=True)
class EngineOptions:
    """What the TensorRT engine (and the compatibility check) is built for."""

    fp16: bool = False
    build_engine: bool = False  # also without --fp16: an fp32 engine
    batch_sizes: tuple[int, int, int] = (1, 1, 8)  # optimisation profile: min, opt, max
    workspace_mb: int = 2048


def export_bundle(run_dir: Path, out: Path | None = None, opset: int = 17, parity_images: int = 8,
                  engine: EngineOptions = EngineOptions()) -> Bundle:
    """Export, verify against PyTorch, check TensorRT compatibility, add the fp16 model and the engine when
    asked, and swap the finished bundle into place (never half-written)."""
    model, run = load_run(run_dir)
    if run.get("state") == "training":
        warn(f"{run_dir}: training has not finished; exporting its best checkpoint so far")
    out = Path(out) if out is not None else Path(run_dir) / "bundle"
    size = tuple(run["config"]["image_size"])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        clock = time.perf_counter()
        export_onnx(model, staging / MODEL_FILE, size, opset)
        export_s = time.perf_counter() - clock
        record = bundle_record(run, opset, size)
        bundle = Bundle(staging, record)
        images = parity_inputs(run, size, parity_images)
        record["export"]["parity"] = check_parity(model, bundle, images)
        record["export"]["seconds"] = round(export_s, 2)
        half_scopes = onnx_scopes(model.half_precision_modules)
        record["precision"] = {"half_scopes": half_scopes, "fp32_nodes": fp32_nodes(staging / MODEL_FILE, half_scopes)}
        record["tensorrt_check"] = report_tensorrt_check(staging / MODEL_FILE, engine.batch_sizes[-1])
        if engine.fp16:
            add_fp16_model(bundle)
        if engine.fp16 or engine.build_engine:
            add_engine(bundle, engine)
        record["files"] = file_digests(staging, model_files(record))
        bundle.save()
        replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(out, record)


def model_files(record: dict) -> list[str]:
    files = [record["model_file"], record.get("fp16_model_file"), (record.get("engine") or {}).get("file")]
    return [name for name in files if name]


def report_tensorrt_check(model_path: Path, max_batch: int) -> dict:
    """Run the TensorRT compatibility check, warn about each problem, and return its record."""
    report = check_tensorrt(model_path, max_batch)
    for problem in report.problems:
        warn(f"TensorRT would refuse {model_path.name}: {problem}")
    if report.ok:
        console.print(f"TensorRT check: every operator, type and shape is supported up to batch {max_batch} "
                      f"(largest tensor {report.largest_tensor[1]:,} elements)")
    return report.to_dict()


def add_fp16_model(bundle: Bundle) -> None:
    """model_fp16.onnx beside model.onnx, for ONNX Runtime's GPU providers."""
    convert_fp16(bundle.model_file, bundle.path / FP16_MODEL_FILE, bundle.record["precision"]["fp32_nodes"])
    bundle.record["fp16_model_file"] = FP16_MODEL_FILE


def add_engine(bundle: Bundle, options: EngineOptions) -> None:
    """Build the TensorRT engine into the bundle folder, or say plainly why none was built."""
    reason = tensorrt_unavailable()
    if reason is not None:
        bundle.record["engine"] = None
        console.print(f"[yellow]no TensorRT engine built[/yellow]: {escape(reason)}. The bundle runs on ONNX Runtime; "
                      f"to build the engine, run inspect-export BUNDLE --engine{' --fp16' if options.fp16 else ''} "
                      "on the device itself")
        return
    if not bundle.record["tensorrt_check"]["ok"]:
        raise InspectError("TensorRT compatibility check failed: " + bundle.record["tensorrt_check"]["problems"][0])
    source = bundle.model_file
    bundle.record["engine"] = build_engine(source, bundle.path / ENGINE_FILE, options.fp16,
                                           bundle.record["precision"]["fp32_nodes"], options.batch_sizes,
                                           options.workspace_mb, bundle.path / TIMING_CACHE_FILE)
    console.print(f"TensorRT engine written ({bundle.record['engine']['gpu']}, TensorRT "
                  f"{bundle.record['engine']['tensorrt']}, {'fp16' if options.fp16 else 'fp32'})")


def engine_for_bundle(bundle_dir: Path, options: EngineOptions) -> Bundle:
    """Add an engine (and the fp16 model) to an existing bundle, on the device that will run it."""
    bundle = load_bundle(bundle_dir)
    if "precision" not in bundle.record:
        raise InspectError(f"{bundle_dir}: exported before fp16 and engine support; export it again from its run "
                           "folder (inspect-export RUN), then build the engine")
    staging = Path(tempfile.mkdtemp(dir=bundle.path.parent, prefix=f".{bundle.path.name}.staging-"))
    try:
        shutil.copytree(bundle.path, staging, dirs_exist_ok=True)
        staged = Bundle(staging, bundle.record)
        if options.fp16 and not bundle.record.get("fp16_model_file"):
            add_fp16_model(staged)
        add_engine(staged, options)
        bundle.record["files"] = file_digests(staging, model_files(bundle.record))
        staged.save()
        replace_dir(staging, bundle.path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(bundle.path)


def export_onnx(model: torch.nn.Module, path: Path, size: tuple[int, int], opset: int) -> None:
    example = torch.zeros(2, *size, 3, dtype=torch.uint8)
    model = with_static_padding(model, example)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=OUTPUT_NAMES,
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}},
        )
    graph = onnx.load(str(path))
    drop_empty_trailing_inputs(graph)
    onnx.save(graph, str(path))
    onnx.checker.check_model(str(path))


def drop_empty_trailing_inputs(graph: onnx.ModelProto) -> None:
    """The exporter writes an omitted optional input as '' (Pad's constant value, for one); ONNX Runtime then
    will not fuse that Pad into the following Conv. Trailing omitted inputs may simply be left out."""
    for node in graph.graph.node:
        while node.input and node.input[-1] == "":
            node.input.pop()


def bundle_record(run: dict, opset: int, size: tuple[int, int]) -> dict:
    data = run["data"]
    return {
        "format_version": BUNDLE_FORMAT_VERSION,
        "model": run["model"],
        "backbone": run["config"].get("backbone"),
        "model_file": MODEL_FILE,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NHWC", "color": "RGB",
                  "size": list(size), "channels": 3},
        "preprocessing": {
            "outside_graph": "decode, grayscale to 3 channels, RGB order, antialiased bilinear resize (Pillow)",
            "inside_graph": {"scale": 1 / 255, **run["normalization"]},
        },
        "outputs": OUTPUT_NAMES,
        "config": run["config"],
        "training": {k: data[k] for k in ("name", "n_fit", "n_validation", "validation")},
        "thresholds": None,
        "export": {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "opset": opset,
            "edge_inspect": edgeinspect.__version__,
            "torch": torch.__version__,
        },
    }


def parity_inputs(run: dict, size: tuple[int, int], count: int) -> np.ndarray:
    """Held-out good images when they are still reachable, else seeded noise: parity is always checked."""
    paths = [Path(p) for p in run["data"]["validation"][:count] if Path(p).is_file()]
    if paths:
        return load_resized(paths, size)[0]
    warn("validation images not found: checking parity on random images")
    return np.random.default_rng(0).integers(0, 256, (count, *size, 3), dtype=np.uint8)


def parity(model: torch.nn.Module, backend, images: np.ndarray) -> dict:
    """How far a runtime backend is from PyTorch on these images, relative to the map's value range."""
    with torch.inference_mode():
        torch_maps, torch_scores = model(torch.from_numpy(images))
    torch_maps, torch_scores = torch_maps[:, 0].numpy(), torch_scores.numpy()
    ort_maps, ort_scores = backend(images)
    map_range = float(torch_maps.max() - torch_maps.min()) or 1.0
    result = {
        "images": int(len(images)),
        "max_abs_diff_map": float(np.abs(ort_maps - torch_maps).max()),
        "max_abs_diff_score": float(np.abs(ort_scores - torch_scores).max()),
        "map_range": map_range,
    }
    result["relative_diff"] = max(result["max_abs_diff_map"], result["max_abs_diff_score"]) / map_range
    return result


def check_parity(model: torch.nn.Module, bundle: Bundle, images: np.ndarray) -> dict:
    """ONNX Runtime must reproduce PyTorch: max |Δmap| ≤ 1e-4 of the map's range, and the same for scores."""
    result = parity(model, OrtCpuBackend(bundle), images)
    if not result["relative_diff"] <= PARITY_TOLERANCE:
        raise InspectError(f"export failed its parity check: ONNX Runtime differs from PyTorch by "
                           f"{result['relative_diff']:.2e} of the map's range (limit {PARITY_TOLERANCE:.0e})")
    console.print(f"parity: ONNX Runtime = PyTorch within {result['relative_diff']:.1e} of the map range "
                  f"on {len(images)} images")
    return result
