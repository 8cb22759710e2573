"""What the device itself adds to a bundle, without torch: the fp16 ONNX model, the TensorRT check and the
TensorRT engine (`inspect-export BUNDLE --engine [--fp16]` on a Jetson or a GPU box)."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.markup import escape

from edgeinspect.runtime.console import InspectError, console, warn
from edgeinspect.runtime.files import staged_dir
from edgeinspect.runtime.inference.bundle import MODEL_FIELDS, Bundle, file_digests, load_bundle

from .precision import convert_fp16
from .tensorrt_check import check_tensorrt
from .tensorrt_engine import ENGINE_FILE, build_engine, tensorrt_unavailable

FP16_MODEL_FILE = "model_fp16.onnx"
DEFAULT_BATCH_SIZES = (1, 1, 8)


@dataclass(frozen=True)
class EngineOptions:
    """What the TensorRT engine (and the compatibility check) is built for."""

    fp16: bool = False
    build_engine: bool = False  # also without --fp16: an fp32 engine
    # optimisation profile min, opt, max; None: the bundle's own (inspect-export RUN: (1, 1, 8))
    batch_sizes: tuple[int, int, int] | None = None
    workspace_mb: int = 2048
    timing_cache: Path | None = None  # None: this machine's cache folder, one file per GPU and TensorRT version
    int8: bool = False  # add the INT8 model (and build the engine from it)
    int8_images: tuple[Path, ...] = ()  # its calibration images; () the run's fit images
    int8_labelled: tuple[tuple[Path, ...], tuple[int, ...]] | None = None  # labelled images for its guard


def model_files(record: dict) -> list[str]:
    files = [*(record.get(field) for field in MODEL_FIELDS), (record.get("engine") or {}).get("file")]
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
    """model_fp16.onnx beside model.onnx: the precision-annotated graph that ONNX Runtime's CUDA provider runs
    and the fp16 TensorRT engine is built from."""
    convert_fp16(bundle.model_file, bundle.path / FP16_MODEL_FILE, bundle.record["precision"]["fp32_nodes"])
    bundle.record["fp16_model_file"] = FP16_MODEL_FILE


def add_engine(bundle: Bundle, options: EngineOptions) -> None:
    """Build the TensorRT engine into the bundle folder from model_fp16.onnx (--fp16) or model.onnx, or say
    plainly why none was built."""
    reason = tensorrt_unavailable()
    if reason is not None:
        bundle.record["engine"] = None
        console.print(f"[yellow]no TensorRT engine built[/yellow]: {escape(reason)}. The bundle runs on ONNX Runtime "
                      f"or OpenVINO; to build the engine, run inspect-export BUNDLE --engine"
                      f"{' --fp16' if options.fp16 else ''} on the device itself")
        return
    int8 = bool(options.int8 and bundle.record.get("int8_model_file"))  # not when the guard refused it
    check = bundle.record["int8"]["tensorrt_check"] if int8 else bundle.record["tensorrt_check"]
    if not check["ok"]:
        raise InspectError(f"TensorRT compatibility check failed{' on the INT8 model' if int8 else ''}: "
                           + check["problems"][0])
    source = (bundle.path / bundle.record["int8_model_file"] if int8 else
              bundle.path / bundle.record["fp16_model_file"] if options.fp16 else bundle.model_file)
    record = build_engine(source, bundle.path / ENGINE_FILE, tuple(bundle.record["batch_profile"]), options.workspace_mb,
                          options.timing_cache)
    bundle.record["engine"] = {**record, "precision": "int8" if int8 else "fp16" if options.fp16 else "fp32"}
    console.print(f"TensorRT engine written ({record['gpu']}, TensorRT {record['tensorrt']}, "
                  f"{bundle.record['engine']['precision']}, from {source.name})")


def add_int8(bundle: Bundle, options: EngineOptions, run_record: Path, refusal_is_error: bool = True) -> None:
    """The INT8 model, calibrated on --int8-images or the fit images recorded in the run's run.json. A guard's
    refusal is an error on a bundle (nothing changes) and, on a fresh export (`refusal_is_error` False), a
    warning: the fp32 bundle is written, its record keeps the refused tries."""
    from .int8 import Int8Refused, add_int8_model

    images = list(options.int8_images)
    if not images and run_record.is_file():
        images = [Path(p) for p in json.loads(run_record.read_text())["data"]["fit"] if Path(p).is_file()]
    if not images:
        raise InspectError(f"--int8: no calibration images (the training run's fit images are not reachable from "
                           f"{run_record}); give --int8-images DIR with good images")
    labelled = None
    if options.int8_labelled:
        labelled = (list(options.int8_labelled[0]), np.array(options.int8_labelled[1]))
    try:
        add_int8_model(bundle, images, labelled)
    except Int8Refused as refusal:
        if refusal_is_error:
            raise
        bundle.record["int8"] = {"refused": str(refusal), "attempts": refusal.attempts}
        warn(f"{refusal}; the fp32 bundle is written without it")


def engine_for_bundle(bundle_dir: Path, options: EngineOptions) -> Bundle:
    """Add an engine, the fp16 model or the INT8 model to an existing bundle, on the device that will run it."""
    bundle = load_bundle(bundle_dir)
    if "precision" not in bundle.record:
        raise InspectError(f"{bundle_dir}: exported before fp16 and engine support; export it again from its run "
                           "folder (inspect-export RUN), then build the engine")
    with staged_dir(bundle.path, copy_of=bundle.path) as staging:  # stale staging of killed exports removed
        staged = Bundle(staging, bundle.record)
        profile = options.batch_sizes or tuple(bundle.record.get("batch_profile") or DEFAULT_BATCH_SIZES)
        if list(profile) != bundle.record.get("batch_profile"):  # another profile: checked again, recorded for all
            bundle.record["tensorrt_check"] = report_tensorrt_check(staging / bundle.record["model_file"], profile[-1])
            bundle.record["batch_profile"] = list(profile)
        if options.fp16 and not bundle.record.get("fp16_model_file"):
            add_fp16_model(staged)
        if options.int8:
            add_int8(staged, options, bundle.path.parent / "run.json")
        if options.fp16 or options.build_engine:
            add_engine(staged, options)
        bundle.record["files"] = file_digests(staging, model_files(bundle.record))
        staged.save()
    return load_bundle(bundle.path)
