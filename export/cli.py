"""inspect-export: a training run → a bundle folder (model.onnx + bundle.json)."""

from pathlib import Path

import typer

from edgeinspect.runtime.console import console, one_line_errors

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
@one_line_errors
def export(
    run_dir: Path = typer.Argument(..., help="Training run folder written by inspect-train."),
    out: Path = typer.Option(None, "--out", help="Bundle folder to write (default: RUN/bundle)."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset version."),
):
    """Export to ONNX (uint8 images in; anomaly_map and score out), check it against PyTorch, write the bundle."""
    from .onnx_export import export_bundle

    bundle = export_bundle(run_dir, out, opset)
    size_mb = sum(f["bytes"] for f in bundle.record["files"].values()) / 1e6
    console.print(f"bundle written to {bundle.path} ({size_mb:.1f} MB); next: inspect-calibrate {bundle.path}")


def main():
    app()
