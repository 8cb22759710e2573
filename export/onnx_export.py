"""One export entry point. The graph takes uint8 RGB images (B, H, W, 3) with a dynamic batch and returns
``anomaly_map`` (B, 1, H, W) and ``score`` (B,); normalisation and the memory bank live inside it."""

import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch

import edgeinspect
from edgeinspect.runtime.console import InspectError, console, warn
from edgeinspect.runtime.files import staged_dir, writable_dir
from edgeinspect.runtime.inference.backends import OrtCpuBackend
from edgeinspect.runtime.inference.bundle import BUNDLE_FORMAT_VERSION, BUNDLE_RECORD, Bundle, file_digests
from edgeinspect.runtime.inference.images import load_resized
from edgeinspect.train.run import load_run

from .device_export import (DEFAULT_BATCH_SIZES, EngineOptions, add_engine, add_fp16_model, add_int8, model_files,
                            report_tensorrt_check)
from .precision import fp32_nodes, onnx_scopes
from .static_padding import with_static_padding

INPUT_NAME = "images"
OUTPUT_NAMES = ["anomaly_map", "score"]
MODEL_FILE = "model.onnx"
# of the anomaly map's value range. Distances are square roots of ‖q‖² − 2·q·m + ‖m‖², whose float32 rounding
# (~1e-7 of ‖q‖², a few thousand) is amplified where a patch nearly matches a bank entry: a patch 0.1 from its
# nearest entry made PatchCore at 512×512 on bottle differ by 1.3e-4 (score 2e-6). A real export fault is far
# larger; 1e-3 of the range (0.02 on bottle) is below a hundredth of the calibration's σ.
PARITY_TOLERANCE = 1e-3
# --opset: torch.onnx's TorchScript exporter writes up to 23 (TensorRT 10.15 reads 9-24, tensorrt_support.json).
# Every kind exports at 11-23; at 9-10 PatchCore and DFR export but fail parity (Resize semantics), and opset 13
# is where Reduce*/Split/Squeeze took their current form, so 13 is the lowest offered.
OPSET_RANGE = (13, 23)


def check_opset(opset: int) -> int:
    low, high = OPSET_RANGE
    if not low <= opset <= high:
        raise InspectError(f"--opset must be from {low} to {high} (what torch.onnx writes and TensorRT reads for "
                           f"these graphs), got {opset}")
    return opset


def check_out(out: Path, option: str = "--out") -> Path:
    """The bundle folder to write: the export replaces it whole, so it must be new, empty or a bundle (never a
    file, nor a folder of other things), and its parent, where the staging folder goes, must be writable."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise InspectError(f"{option} {out}: is a file, not a folder")
        if any(out.iterdir()) and not (out / BUNDLE_RECORD).is_file():
            raise InspectError(f"{option} {out}: holds files but no {BUNDLE_RECORD}; the export replaces the whole "
                               "folder, so give a new or empty folder, or an existing bundle")
    writable_dir(out.parent, option, shown=out)
    return out


def export_bundle(run_dir: Path, out: Path | None = None, opset: int = 17, parity_images: int = 8,
                  engine: EngineOptions = EngineOptions()) -> Bundle:
    """Export, verify against PyTorch, check TensorRT compatibility, add the fp16 model and the engine when
    asked, and swap the finished bundle into place (never half-written)."""
    check_opset(opset)
    model, run = load_run(run_dir)  # first: a mistyped RUN is refused before RUN/bundle's parent is made
    out = check_out(out) if out is not None else check_out(Path(run_dir) / "bundle", "--out (default RUN/bundle)")
    if run.get("state") == "training":
        warn(f"{run_dir}: training has not finished; exporting its best checkpoint so far")
    size = tuple(run["config"]["image_size"])
    with staged_dir(out) as staging:  # stale staging of killed exports removed
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
        profile = engine.batch_sizes or DEFAULT_BATCH_SIZES
        record["tensorrt_check"] = report_tensorrt_check(staging / MODEL_FILE, profile[-1])
        record["batch_profile"] = list(profile)
        if engine.fp16:
            add_fp16_model(bundle)
        if engine.int8:
            add_int8(bundle, engine, Path(run_dir) / "run.json", refusal_is_error=False)
        if engine.fp16 or engine.build_engine:
            add_engine(bundle, engine)
        record["files"] = file_digests(staging, model_files(record))
        bundle.save()
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
            "outside_graph": "decode, grayscale to 3 channels, RGB order, antialiased bilinear resize (Pillow) to the "
                             "input size, stretched whatever the frame's aspect ratio",
            "inside_graph": {"scale": 1 / 255, **run["normalization"]},
        },
        "outputs": OUTPUT_NAMES,
        "config": run["config"],
        "training": {k: data.get(k) for k in ("name", "n_fit", "n_validation", "validation", "input_geometry")},
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
    """ONNX Runtime must reproduce PyTorch: max |Δmap| ≤ 1e-3 of the map's range, and the same for scores."""
    result = parity(model, OrtCpuBackend(bundle), images)
    if not result["relative_diff"] <= PARITY_TOLERANCE:
        raise InspectError(f"export failed its parity check: ONNX Runtime differs from PyTorch by "
                           f"{result['relative_diff']:.2e} of the map's range (limit {PARITY_TOLERANCE:.0e})")
    console.print(f"parity: ONNX Runtime = PyTorch within {result['relative_diff']:.1e} of the map range "
                  f"on {len(images)} images")
    return result
