"""One export entry point. The graph takes uint8 RGB images (B, H, W, 3) with a dynamic batch and returns
``anomaly_map`` (B, 1, H, W) and ``score`` (B,); normalisation and the memory bank live inside it."""

import shutil
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch

import edgeinspect
from edgeinspect.runtime.backends import OrtCpuBackend
from edgeinspect.runtime.bundle import BUNDLE_FORMAT_VERSION, Bundle, file_digests
from edgeinspect.runtime.console import InspectError, console, warn
from edgeinspect.runtime.files import replace_dir
from edgeinspect.runtime.images import load_resized
from edgeinspect.train.run import load_run

from .device_export import EngineOptions, add_engine, add_fp16_model, model_files, report_tensorrt_check
from .precision import fp32_nodes, onnx_scopes
from .static_padding import with_static_padding

INPUT_NAME = "images"
OUTPUT_NAMES = ["anomaly_map", "score"]
MODEL_FILE = "model.onnx"
PARITY_TOLERANCE = 1e-4  # of the anomaly map's value range


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
        record["batch_profile"] = list(engine.batch_sizes)
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
