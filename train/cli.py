"""inspect-train: learn what good parts look like from good images only."""

from pathlib import Path

import typer

from edgeinspect.runtime.console import InspectError, console, one_line_errors
from edgeinspect.runtime.datasets import open_dataset

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)


def parse_size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 32:
        raise InspectError(f"--image-size {text!r}: give N or HxW, at least 32 pixels")
    return (parts[0], parts[-1])


@app.command()
@one_line_errors
def patchcore(
    data: str = typer.Option(..., "--data", help="MVTec AD category folder, a folder of good images, or elpv."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (model.pt, run.json)."),
    backbone: str = typer.Option("tf_efficientnet_lite0", "--backbone",
                                 help="tf_efficientnet_lite0 (offline weights), resnet18 or wide_resnet50_2."),
    weights: Path = typer.Option(None, "--weights", help="Backbone state dict file, instead of the ImageNet weights."),
    image_size: str = typer.Option("256", "--image-size", help="Model input size, N or HxW."),
    coreset_ratio: float = typer.Option(0.01, "--coreset-ratio", help="Fraction of patches kept in the memory bank."),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="Good images held out for calibration."),
    seed: int = typer.Option(0, "--seed", help="Seed of the validation split, projection and coreset."),
):
    """PatchCore: a memory bank of pretrained patch features; anomaly = distance to the nearest good patch."""
    from edgeinspect.train.patchcore import PatchCoreConfig
    from edgeinspect.train.run import train_patchcore

    config = PatchCoreConfig(backbone=backbone, image_size=parse_size(image_size), coreset_ratio=coreset_ratio,
                             seed=seed)
    record = train_patchcore(config, open_dataset(data), out, val_fraction, weights)
    bank = record["memory_bank"]
    console.print(f"memory bank {bank['entries']} × {bank['dim']} from {bank['patches']} patches of "
                  f"{record['data']['n_fit']} images ({record['data']['n_validation']} held out) in "
                  f"{record['timings']['total_s']:.1f} s; run written to {out}; next: inspect-export {out}")


@app.callback()
def models():
    """Train an anomaly model on good images; the run folder feeds inspect-export."""


def main():
    app()
