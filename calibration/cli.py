"""inspect-calibrate and inspect-eval: thresholds and metrics measured through the bundle, without torch."""

import json
from pathlib import Path

import typer
from rich.table import Table

from edgeinspect.runtime.bundle import load_bundle
from edgeinspect.runtime.console import InspectError, console, one_line_errors
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.files import atomic_write_json
from edgeinspect.runtime.images import list_images

from .evaluate import METRIC_COLUMNS, evaluate, metrics_rows
from .thresholds import calibrate

calibrate_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
eval_app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@calibrate_app.command()
@one_line_errors
def calibrate_command(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by inspect-export."),
    images: Path = typer.Option(None, "--images", help="Folder of good images captured on the line "
                                "(default: the held-out validation images recorded at training)."),
    k: float = typer.Option(3.0, "--k", help="Threshold = mean + k × standard deviation of good scores."),
):
    """Set the image and pixel thresholds at μ + k·σ of held-out good images, run through the bundle itself."""
    bundle = load_bundle(bundle_dir)
    if images is not None:
        paths, source = list_images(images), str(images)
    else:
        paths, source = [Path(p) for p in bundle.record["training"]["validation"]], "validation"
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise InspectError(f"{missing[0]}: validation image not found ({len(missing)} missing); "
                               "pass --images with a folder of good images")
    thresholds = calibrate(bundle, paths, k, source)
    for level in ("image", "pixel"):
        t = thresholds[level]
        console.print(f"{level} threshold {t['threshold']:.4f} = {t['mean']:.4f} + {k:g} × {t['std']:.4f} "
                      f"(n = {t['n']})")
    console.print(f"written to {bundle.path / 'bundle.json'}")


@eval_app.command()
@one_line_errors
def eval_command(
    bundle_dir: Path = typer.Argument(..., help="Bundle folder written by inspect-export (calibrated or not)."),
    data: str = typer.Option(..., "--data", help="MVTec AD category folder, or a built-in name (elpv)."),
    out: Path = typer.Option(None, "--out", help="Where to write the metrics JSON (default: BUNDLE/eval.json)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per inference call."),
):
    """Image AUROC, pixel AUROC, AUPRO, F1-max and precision/recall/accuracy at the calibrated threshold,
    per defect type and overall (pixel metrics only where the data set has ground-truth masks)."""
    bundle = load_bundle(bundle_dir)
    result = evaluate(bundle, open_dataset(data), batch_size)
    table = Table(*METRIC_COLUMNS, title=f"{result['dataset']}: {result['n_images']} test images")
    for row in metrics_rows(result):
        table.add_row(*row)
    console.print(table)
    out = out or bundle.path / "eval.json"
    atomic_write_json(out, result)
    console.print(f"metrics written to {out}")


def calibrate_main():
    calibrate_app()


def eval_main():
    eval_app()
