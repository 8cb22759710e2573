"""inspect-export: a training run → a bundle folder (model.onnx + bundle.json); on a bundle, the TensorRT
compatibility check or the engine build for this device."""

from pathlib import Path

import typer

from edgeinspect.runtime.console import InspectError, command_app, console, one_line_errors
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.inference.bundle import BUNDLE_RECORD, load_bundle
from edgeinspect.runtime.inference.images import list_images
from edgeinspect.runtime.inference.signing import load_key, sign

app = command_app()
MAX_WORKSPACE_MB = 1 << 20


def parse_batch_sizes(text: str) -> tuple[int, int, int]:
    try:
        sizes = tuple(int(p) for p in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or not 1 <= sizes[0] <= sizes[1] <= sizes[2]:
        raise InspectError(f"--batch-sizes {text!r}: give MIN,OPT,MAX with 1 ≤ MIN ≤ OPT ≤ MAX")
    return sizes


@app.command()
@one_line_errors
def export(
    path: Path = typer.Argument(..., help="Training run folder (written by inspect-train), or a bundle folder "
                                "for --check / --engine."),
    out: Path = typer.Option(None, "--out", help="Bundle folder to write (default: RUN/bundle)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version, 13 to 23."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write an fp16 ONNX model and, where TensorRT and a GPU "
                              "are present, an fp16 TensorRT engine (fragile layers stay fp32)."),
    engine: bool = typer.Option(False, "--engine", help="Build the TensorRT engine on this device (fp32 unless "
                                "--fp16)."),
    check: bool = typer.Option(False, "--check", help="Only check a bundle's ONNX graph against TensorRT's "
                               "support (runs on any CPU; also done at every export)."),
    batch_sizes: str = typer.Option(None, "--batch-sizes", help="Engine optimisation profile MIN,OPT,MAX (default "
                                    "1,1,8 at export, the bundle's own on a bundle); MAX "
                                    "also bounds the tensor-size check."),
    workspace_mb: int = typer.Option(2048, "--workspace-mb", help="TensorRT builder workspace limit in MiB."),
    timing_cache: Path = typer.Option(None, "--timing-cache", help="TensorRT timing cache file (default: one per "
                                      "GPU model and TensorRT version in ~/.cache/edge-inspect/tensorrt)."),
    int8: bool = typer.Option(False, "--int8", help="Add an INT8 model (NNCF's QDQ ONNX, activations calibrated on "
                              "the run's good training images), checked against fp32 on the held-out good images; "
                              "with --engine the engine is built from it. No torch needed: works on a bundle too."),
    int8_images: Path = typer.Option(None, "--int8-images", help="Good images to calibrate the INT8 model on "
                                     "(default: the training run's fit images)."),
    int8_data: str = typer.Option(None, "--int8-data", help="Labelled data (MVTec AD layout, or elpv) on which the "
                                  "INT8 model's image AUROC may fall at most 0.01 below fp32's."),
    sign_key: Path = typer.Option(None, "--sign", help="Ed25519 private key (PEM) to sign the bundle with "
                                  "(inspect-run --trust PUBKEY then refuses any other); calibrating changes the "
                                  "thresholds, so sign again there: inspect-calibrate --sign KEY."),
):
    """Export to ONNX (uint8 images in; anomaly_map and score out), check it against PyTorch and against what
    TensorRT accepts, and write the bundle. On a bundle (--engine, --fp16, --check) no torch is needed."""
    from .device_export import DEFAULT_BATCH_SIZES, EngineOptions, engine_for_bundle, report_tensorrt_check

    if not 1 <= workspace_mb <= MAX_WORKSPACE_MB:
        raise InspectError(f"--workspace-mb must be from 1 to {MAX_WORKSPACE_MB} (1 TiB), got {workspace_mb}")
    if sign_key is not None:
        load_key(sign_key, "private", "--sign")  # before anything is exported
    labelled = None
    if int8_data is not None:
        samples = open_dataset(int8_data).test
        labelled = (tuple(s.path for s in samples), tuple(s.label for s in samples))
    options = EngineOptions(fp16=fp16, build_engine=engine, workspace_mb=workspace_mb, timing_cache=timing_cache,
                            batch_sizes=parse_batch_sizes(batch_sizes) if batch_sizes else None, int8=int8,
                            int8_images=tuple(list_images(int8_images)) if int8_images else (), int8_labelled=labelled)
    is_bundle = (path / BUNDLE_RECORD).is_file()
    if is_bundle and out is not None:
        raise InspectError(f"--out: {path} is a bundle, which --check reads and --engine/--fp16 update in place; "
                           "--out is for exporting a training run")
    if check:
        if not is_bundle:
            raise InspectError(f"{path}: --check needs a bundle folder (one with {BUNDLE_RECORD})")
        bundle = load_bundle(path)
        profile = options.batch_sizes or bundle.record.get("batch_profile") or DEFAULT_BATCH_SIZES
        model_file = bundle.model_file
        report = report_tensorrt_check(model_file, profile[-1])
        if not report["ok"]:
            raise InspectError(f"{model_file}: {len(report['problems'])} problem(s) for TensorRT, first: "
                               f"{report['problems'][0]}")
        return
    if is_bundle:
        if not (engine or fp16 or int8):
            raise InspectError(f"{path} is a bundle: give --engine/--fp16/--int8 to build for this device, or --check")
        bundle = engine_for_bundle(path, options)
    else:
        from .onnx_export import export_bundle  # torch, timm and the training code: the workstation only

        bundle = export_bundle(path, out, opset, engine=options)
    if sign_key is not None:
        bundle.record["signature"] = sign(bundle.record, sign_key)
        bundle.save()
        console.print(f"signed with key {bundle.record['signature']['key']}")
    size_mb = sum(f["bytes"] for f in bundle.record["files"].values()) / 1e6
    console.print(f"bundle written to {bundle.path} ({size_mb:.1f} MB); next: inspect-calibrate {bundle.path}")


def main():
    app()
