"""inspect-train: learn what good parts look like from good images only, one sub-command per model kind."""

import dataclasses
import math
from pathlib import Path
from typing import Annotated

import typer

from edgeinspect.runtime.console import InspectError, command_app, console, one_line_errors
from edgeinspect.runtime.datasets import open_dataset, split_fit_validation
from edgeinspect.runtime.inference.bundle import MAX_INPUT_SIDE

app = command_app(no_args_is_help=True)

Data = Annotated[str, typer.Option("--data", help="MVTec AD category folder, a folder of good images, or elpv.")]
Out = Annotated[Path, typer.Option("--out", help="Run folder to write (model.pt, run.json).")]
Backbone = Annotated[str, typer.Option("--backbone", help="tf_efficientnet_lite0, _lite1 or _lite2 (offline "
                                                          "weights), resnet18 or wide_resnet50_2.")]
Weights = Annotated[Path, typer.Option("--weights", help="Backbone state dict file, instead of the ImageNet weights.")]
ImageSize = Annotated[str, typer.Option("--image-size", help="Model input size: auto (from the training images: their "
                                                              "median aspect and size, upscaled to at least 256×256, "
                                                              "downscaled to at most 448×448 pixels), N or HxW.")]
ValFraction = Annotated[float, typer.Option("--val-fraction", help="Good images held out for validation and "
                                                                   "calibration.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the validation split and of every random choice.")]
Epochs = Annotated[int, typer.Option("--epochs", help="Most epochs to train.")]
BatchSize = Annotated[int, typer.Option("--batch-size", help="Images per optimisation step.")]
LearningRate = Annotated[float, typer.Option("--lr", help="Learning rate.")]
Patience = Annotated[int, typer.Option("--patience", help="Stop after this many epochs without a better "
                                                          "validation loss.")]
Device = Annotated[str, typer.Option("--device", help="Where to train: auto (the CUDA GPU when PyTorch sees one, "
                                                      "else the CPU), cpu or cuda.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --out (run.json, model.pt) "
                                                             "and remove its bundle/; without it such an --out is "
                                                             "refused.")]
MIN_IMAGE_SIDE = 32
AUTO_SIZE = "auto"


def parse_size(text: str) -> tuple[int, int] | None:
    """--image-size N or HxW, each side from 32 to 4096 pixels (the memory of training grows with the square);
    None for auto (chosen from the training images once they are known)."""
    if text.strip().lower() == AUTO_SIZE:
        return None
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not all(MIN_IMAGE_SIDE <= p <= MAX_INPUT_SIDE for p in parts):
        raise InspectError(f"--image-size {text!r}: give {AUTO_SIZE}, N or HxW, each side from {MIN_IMAGE_SIDE} to "
                           f"{MAX_INPUT_SIDE} pixels")
    return (parts[0], parts[-1])


def check_fraction(value: float, option: str) -> float:
    """A fraction strictly between 0 and 1 (NaN and infinities refused)."""
    if not (math.isfinite(value) and 0 < value < 1):
        raise InspectError(f"{option} must be between 0 and 1 (exclusive), got {value:g}")
    return value


def train_and_report(kind: str, config, data: str, out: Path, val_fraction: float, weights: Path | None,
                     device: str, overwrite: bool = False) -> None:
    from edgeinspect.train.devices import out_of_memory, resolve_device
    from edgeinspect.train.run import prepare_run_folder, train_model

    check_fraction(val_fraction, "--val-fraction")
    if weights is not None and not weights.is_file():
        raise InspectError(f"--weights {weights}: no such file")
    torch_device = resolve_device(device)  # a wrong --device fails before any image is read
    dataset = open_dataset(data)
    fit_paths, _ = split_fit_validation(dataset.good, val_fraction, config.seed)  # before --out is touched
    config, geometry = input_geometry(config, fit_paths)
    out = prepare_run_folder(out, overwrite)
    try:
        record = train_model(kind, config, dataset, out, val_fraction, weights, torch_device, geometry)
    except Exception as error:
        if not out_of_memory(error):
            raise
        raise InspectError(f"out of memory training at {config.image_size[0]}×{config.image_size[1]} on "
                           f"{len(fit_paths)} images on {torch_device}: give a smaller --image-size (or fewer "
                           "images)") from None
    fitted = f"{record['data']['n_fit']} images ({record['data']['n_validation']} held out)"
    training = record.get("training")
    if training:
        console.print(f"best epoch {training['best_epoch']} of {training['epochs_run']} "
                      f"(validation loss {training['best_validation_loss']:.4g}; stopped: {training['stopped']})")
    if "memory_bank" in record:
        bank = record["memory_bank"]
        console.print(f"memory bank {bank['entries']} × {bank['dim']} from {bank['patches']} patches")
    console.print(f"{kind} fitted on {fitted} in {record['timings']['total_s']:.1f} s on {record['device']}; "
                  f"run written to {out}; next: inspect-export {out}")


def input_geometry(config, fit_paths: list[Path]):
    """The configuration with its input size (chosen from the fit images' sizes where --image-size is auto) and
    the record of that choice; says what was chosen and why."""
    from edgeinspect.train.input_size import choose_input_size, image_sizes

    sizes = image_sizes(fit_paths)
    if config.image_size is not None and not sizes:  # reading the images says which ones are unreadable
        return config, None
    geometry = choose_input_size(sizes, config.input_step)
    record = {**geometry.to_dict(), "chosen_by": "--image-size" if config.image_size else AUTO_SIZE}
    auto = "×".join(map(str, geometry.size))
    if config.image_size is None:
        console.print(f"input {auto} ({geometry.reason}; --image-size overrides)")
        return dataclasses.replace(config, image_size=geometry.size), record
    given = "×".join(map(str, config.image_size))
    if tuple(config.image_size) != geometry.size:
        console.print(f"input {given} (--image-size; auto would choose {auto}: {geometry.reason})")
    return config, {**record, "size": tuple(config.image_size)}


@app.command()
@one_line_errors
def patchcore(data: Data, out: Out, backbone: Backbone = "tf_efficientnet_lite0", weights: Weights = None,
              image_size: ImageSize = AUTO_SIZE, val_fraction: ValFraction = 0.2, seed: Seed = 0,
              coreset_ratio: Annotated[float, typer.Option("--coreset-ratio", help="Fraction of patches kept in the "
                                                                                   "memory bank.")] = 0.1,
              max_bank: Annotated[int, typer.Option("--max-bank", help="Most entries in the memory bank, whatever "
                                                    "the patch count (bounds the per-frame cost at large sizes).")
                                  ] = 3648,
              feature_dim: Annotated[int, typer.Option("--feature-dim", help="Principal components of the patch "
                                                       "features kept for the bank (0: every channel).")] = 64,
              normalization: Annotated[str, typer.Option(
                  "--normalization", help="Input normalisation: backbone (what its weights were trained with) or "
                                          "imagenet (ImageNet statistics, whatever the backbone).")
              ] = "backbone",
              image_score: Annotated[str, typer.Option(
                  "--image-score", help="The image's score: map-max (the highest value of its anomaly map) or "
                                        "reweighted (the PatchCore paper's reweighted worst-patch distance).")
              ] = "map-max", device: Device = "auto", overwrite: Overwrite = False):
    """PatchCore: a memory bank of pretrained patch features; anomaly = distance to the nearest good patch."""
    from edgeinspect.train.patchcore import PatchCoreConfig

    config = PatchCoreConfig(backbone=backbone, image_size=parse_size(image_size), coreset_ratio=coreset_ratio,
                             coreset_max_entries=max_bank, feature_dim=feature_dim, seed=seed,
                             normalization=normalization, image_score=image_score)
    train_and_report("patchcore", config, data, out, val_fraction, weights, device, overwrite)


@app.command()
@one_line_errors
def stpm(data: Data, out: Out, backbone: Backbone = "tf_efficientnet_lite0", weights: Weights = None,
         image_size: ImageSize = AUTO_SIZE, val_fraction: ValFraction = 0.2, seed: Seed = 0, epochs: Epochs = 100,
         batch_size: BatchSize = 32, lr: LearningRate = 0.4, patience: Patience = 10, device: Device = "auto",
         overwrite: Overwrite = False):
    """STPM: a student network learns the pretrained teacher's features on good parts; anomaly = where they differ."""
    from edgeinspect.train.stpm import STPMConfig

    config = STPMConfig(backbone=backbone, image_size=parse_size(image_size), seed=seed, epochs=epochs,
                        batch_size=batch_size, learning_rate=lr, patience=patience)
    train_and_report("stpm", config, data, out, val_fraction, weights, device, overwrite)


@app.command()
@one_line_errors
def dfr(data: Data, out: Out, backbone: Backbone = "tf_efficientnet_lite0", weights: Weights = None,
        image_size: ImageSize = AUTO_SIZE, val_fraction: ValFraction = 0.2, seed: Seed = 0, epochs: Epochs = 100,
        batch_size: BatchSize = 4, lr: LearningRate = 1e-4, patience: Patience = 10,
        latent_dim: Annotated[int, typer.Option("--latent-dim", help="Autoencoder bottleneck width (default: "
                                                                     "PCA keeping --variance-kept).")] = None,
        variance_kept: Annotated[float, typer.Option("--variance-kept", help="Feature variance the PCA choice of "
                                                                             "the bottleneck keeps.")] = 0.9,
        device: Device = "auto", overwrite: Overwrite = False):
    """DFR: an autoencoder of 1×1 convolutions reconstructs regional features; anomaly = reconstruction error."""
    from edgeinspect.train.dfr import DFRConfig

    if latent_dim is not None and latent_dim < 1:
        raise InspectError(f"--latent-dim must be at least 1, got {latent_dim}")
    config = DFRConfig(backbone=backbone, image_size=parse_size(image_size), seed=seed, epochs=epochs,
                       batch_size=batch_size, learning_rate=lr, patience=patience, latent_dim=latent_dim,
                       variance_kept=variance_kept)
    train_and_report("dfr", config, data, out, val_fraction, weights, device, overwrite)


@app.command()
@one_line_errors
def autoencoder(data: Data, out: Out, image_size: ImageSize = AUTO_SIZE, val_fraction: ValFraction = 0.2,
                seed: Seed = 0, epochs: Epochs = 100, batch_size: BatchSize = 16, lr: LearningRate = 1e-3,
                patience: Patience = 10, device: Device = "auto", overwrite: Overwrite = False):
    """Naive baseline: a convolutional autoencoder on pixels; anomaly = pixel reconstruction error."""
    from edgeinspect.train.autoencoder import AutoencoderConfig

    config = AutoencoderConfig(image_size=parse_size(image_size), seed=seed, epochs=epochs, batch_size=batch_size,
                               learning_rate=lr, patience=patience)
    train_and_report("autoencoder", config, data, out, val_fraction, None, device, overwrite)


@app.callback()
def models():
    """Train an anomaly model on good images; the run folder feeds inspect-export."""


def main():
    app()
