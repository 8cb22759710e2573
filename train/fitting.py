"""Gradient training shared by the models with learned weights (STPM, DFR, the autoencoder): seeded
mini-batches, a validation loss on the held-out good images after every epoch, the best epoch kept,
early stopping, and Ctrl-C that stops training but keeps the best weights so far."""

import math
import time
from typing import Callable

import torch
from rich.progress import Progress
from torch import nn

from edgeinspect.runtime.console import InspectError

from .configs import GradientConfig
from .devices import CPU

Loss = Callable[..., torch.Tensor]  # mini-batch tensors → mean loss of the batch


def map_in_batches(function: Callable, images, batch_size: int = 16, progress=None,
                   device: torch.device = CPU) -> list[torch.Tensor]:
    """Apply `function` (uint8 image batch → tensor or list of tensors, each with the same number of rows per
    image) to uint8 images (N, H, W, 3) in batches on `device`, without gradients; returns each output over all
    images, on `device`. The outputs are filled in place: concatenating the batches' at the end would hold every
    feature twice (DFR's features of 762 magnetic_tile images at 512×512 are 9.6 GB)."""
    outputs, rows_per_image = [], []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.as_tensor(images[start:start + batch_size]).to(device)
            result = function(batch)
            parts = list(result) if isinstance(result, (list, tuple)) else [result]
            if not outputs:
                rows_per_image = [len(part) // len(batch) for part in parts]
                outputs = [torch.empty((len(images) * rows, *part.shape[1:]), dtype=part.dtype, device=part.device)
                           for part, rows in zip(parts, rows_per_image)]
            for output, part, rows in zip(outputs, parts, rows_per_image):
                output[start * rows:start * rows + len(part)] = part
            if progress is not None:
                progress(len(batch))
    return outputs


def batches(count: int, batch_size: int, generator: torch.Generator | None = None):
    """CPU index tensors covering range(count), shuffled when a (CPU) generator is given, so the order is the
    same whatever device trains; a trailing batch of one is merged into the previous batch (BatchNorm cannot
    train on a single sample)."""
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    starts = list(range(0, count, batch_size))
    if len(starts) > 1 and count - starts[-1] == 1:
        starts.pop()
    ends = starts[1:] + [count]
    return [order[start:end] for start, end in zip(starts, ends)]


def select_rows(data: tuple[torch.Tensor, ...], index: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows `index` (a CPU index) of every tensor, taken on the tensor's own device."""
    return tuple(tensor[index.to(tensor.device)] for tensor in data)


def mean_loss(loss: Loss, data: tuple[torch.Tensor, ...], batch_size: int) -> float:
    """The loss over a whole data set, without gradients."""
    total, count = 0.0, len(data[0])
    with torch.no_grad():
        for index in batches(count, batch_size):
            total += float(loss(*select_rows(data, index))) * len(index)
    return total / count


def fit_by_gradient(model: nn.Module, loss: Loss, optimizer: torch.optim.Optimizer, fit: tuple[torch.Tensor, ...],
                    validation: tuple[torch.Tensor, ...], config: GradientConfig, bar: Progress,
                    on_best: Callable[[dict], None]) -> dict:
    """Train until `config.epochs`, early stopping or Ctrl-C; load the weights of the best validation epoch.

    The caller puts the model and the `fit` and `validation` tensors on the device to train on, once (the data
    are small next to the activations); the shuffled order is drawn on the CPU, the same on every device.
    `on_best(summary)` is called whenever the validation loss improves, so a checkpoint can be written.
    Returns the summary: epochs run, best epoch and loss, why it stopped, per-epoch history and timings.
    """
    generator = torch.Generator().manual_seed(config.seed)
    task = bar.add_task("epochs", total=config.epochs)
    summary = {"epochs_run": 0, "best_epoch": None, "best_validation_loss": float("inf"), "stopped": "epochs",
               "train_s": 0.0, "validation_s": 0.0, "history": []}
    best_state = None
    try:
        for epoch in range(1, config.epochs + 1):
            clock = time.perf_counter()
            model.train()
            train_total = 0.0
            for index in batches(len(fit[0]), config.batch_size, generator):
                optimizer.zero_grad(set_to_none=True)
                value = loss(*select_rows(fit, index))
                value.backward()
                optimizer.step()
                train_total += float(value.detach()) * len(index)
            summary["train_s"] += time.perf_counter() - clock
            clock = time.perf_counter()
            model.eval()
            validation_loss = mean_loss(loss, validation, config.batch_size)
            summary["validation_s"] += time.perf_counter() - clock
            train_loss = train_total / len(fit[0])
            summary["epochs_run"] = epoch
            summary["history"].append({"epoch": epoch, "train_loss": train_loss, "validation_loss": validation_loss})
            bar.update(task, advance=1, description=f"epoch {epoch}: train {train_loss:.4g}, "
                                                    f"validation {validation_loss:.4g}")
            if not math.isfinite(validation_loss):  # diverged: keep the best epoch so far, if there is one
                summary["stopped"] = "diverged"
                break
            if validation_loss < summary["best_validation_loss"]:
                summary.update(best_epoch=epoch, best_validation_loss=validation_loss)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                on_best(summary)
            elif epoch - summary["best_epoch"] >= config.patience:
                summary["stopped"] = "early"
                break
    except KeyboardInterrupt:
        summary["stopped"] = "interrupted"
    if summary["stopped"] == "diverged" and best_state is None:
        raise InspectError(f"training diverged: the validation loss of epoch {summary['epochs_run']} is "
                           f"{summary['history'][-1]['validation_loss']} (give a lower --lr)")
    if best_state is not None:
        model.load_state_dict(best_state)
    summary["train_s"], summary["validation_s"] = round(summary["train_s"], 2), round(summary["validation_s"], 2)
    return summary


def mean_and_covariance(features: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and summed centred outer products (C, C) of features (N, C), in float64 over chunks of rows on the
    features' device (a million patches never need a float64 copy at once)."""
    mean = sum(features[i:i + chunk].double().sum(0) for i in range(0, len(features), chunk)) / len(features)
    covariance = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64, device=features.device)
    for start in range(0, len(features), chunk):
        block = features[start:start + chunk].double() - mean
        covariance += block.T @ block
    return mean, covariance
