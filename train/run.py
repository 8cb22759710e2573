"""A training run folder: ``model.pt`` (tensors only, no pickled classes, always on the CPU) and ``run.json``
(the model kind, its configuration, the device it was trained on, and which good images were fitted on and which
were held out for calibration)."""

import io
import json
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from edgeinspect.runtime.console import InspectError, progress_bar
from edgeinspect.runtime.datasets import Dataset, split_fit_validation
from edgeinspect.runtime.files import atomic_write_bytes, atomic_write_json, remove_stale_staging, writable_dir
from edgeinspect.runtime.inference.images import load_resized

from .backbones import Normalization
from .configs import ModelConfig
from .devices import CPU, describe_device
from .layers import ImageInput
from .registry import model_kind

RUN_FORMAT_VERSION = 1
RUN_RECORD = "run.json"
RUN_WEIGHTS = "model.pt"
RUN_BUNDLE = "bundle"  # where inspect-export writes the run's bundle by default


def prepare_run_folder(out: Path, overwrite: bool = False) -> Path:
    """Make --out a writable folder for a new run. One that already holds a run (run.json, model.pt or its
    bundle/) is refused unless `overwrite`; then the old run and its bundle are removed first, so that a
    stale bundle never sits beside a new model."""
    out = writable_dir(out, "--out")
    held = [name for name in (RUN_RECORD, RUN_WEIGHTS, RUN_BUNDLE) if (out / name).exists()]
    if held and not overwrite:
        raise InspectError(f"--out {out}: already holds a training run ({', '.join(held)}); give --overwrite to "
                           f"replace it (its {RUN_BUNDLE}/ is removed too), or another --out")
    if held:
        remove_stale_staging(out / RUN_BUNDLE)
        try:
            if (out / RUN_BUNDLE).is_dir() and not (out / RUN_BUNDLE).is_symlink():
                shutil.rmtree(out / RUN_BUNDLE)
            else:
                (out / RUN_BUNDLE).unlink(missing_ok=True)
            for name in (RUN_RECORD, RUN_WEIGHTS):
                (out / name).unlink(missing_ok=True)
        except OSError as error:
            raise InspectError(f"--out {out}: cannot remove the old run ({error.strerror or error})") from None
    return out


def train_model(kind: str, config: ModelConfig, dataset: Dataset, out: Path, val_fraction: float = 0.2,
                weights: Path | None = None, device: torch.device = CPU, input_geometry: dict | None = None) -> dict:
    """Fit a model of `kind` on the fit split of the good images, computing on `device`, and write the run
    folder; returns the record. `input_geometry`: how the input size was chosen (train/input_size.py).

    Models trained by gradient write a checkpoint of their best epoch as they go (state "training"), so an
    interrupted run still leaves a complete, exportable folder.
    """
    spec = model_kind(kind)
    fit_paths, validation_paths = split_fit_validation(dataset.good, val_fraction, config.seed)
    started = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("reading good images", total=len(fit_paths) + len(validation_paths))
        fit_images, fit_paths = load_resized(fit_paths, config.image_size, lambda n: bar.advance(task, n))
        validation_images, validation_paths = load_resized(validation_paths, config.image_size,
                                                           lambda n: bar.advance(task, n))
        read_s = time.perf_counter() - started
        data = {**_data_summary(dataset, fit_paths, validation_paths), "input_geometry": input_geometry}

        def record(model, used_config, details, state) -> dict:
            timings = {"read_images_s": round(read_s, 2), **details.pop("timings", {}),
                       "total_s": round(time.perf_counter() - started, 2)}
            return {
                "format_version": RUN_FORMAT_VERSION,
                "model": kind,
                "state": state,
                "config": used_config.to_dict(),
                "normalization": model.image_input.normalization.to_dict(),
                "data": data,
                "device": describe_device(device),
                **details,
                "timings": timings,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }

        def checkpoint(model, used_config, details):
            save_run(out, model, record(model, used_config, dict(details), "training"))

        model, used_config, details = spec.fit(config, fit_images, validation_images, weights, bar, checkpoint,
                                               device)
    stopped = details.get("training", {}).get("stopped")
    result = record(model, used_config, details, "interrupted" if stopped == "interrupted" else "finished")
    save_run(out, model, result)
    return result


def _data_summary(dataset: Dataset, fit: list[Path], validation: list[Path]) -> dict:
    return {
        "name": dataset.name,
        "n_fit": len(fit),
        "n_validation": len(validation),
        "fit": [str(Path(p).resolve()) for p in fit],
        "validation": [str(Path(p).resolve()) for p in validation],
    }


def save_run(out: Path, model: torch.nn.Module, record: dict) -> None:
    """Weights first, then the record that names them: a run folder with a run.json is always complete. The
    tensors are saved from the CPU, so checkpoints of a model training on the GPU load anywhere."""
    buffer = io.BytesIO()
    torch.save({name: tensor.cpu() for name, tensor in model.state_dict().items()}, buffer)
    atomic_write_bytes(Path(out) / RUN_WEIGHTS, buffer.getvalue())
    atomic_write_json(Path(out) / RUN_RECORD, record)


def load_run(run_dir: Path) -> tuple[torch.nn.Module, dict]:
    """The trained model (eval mode) and its run record."""
    run_dir = Path(run_dir)
    record_path, weights_path = run_dir / RUN_RECORD, run_dir / RUN_WEIGHTS
    if not record_path.is_file() or not weights_path.is_file():
        raise InspectError(f"{run_dir}: not a training run (needs {RUN_RECORD} and {RUN_WEIGHTS}; see inspect-train)")
    try:
        record = json.loads(record_path.read_text())
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InspectError(f"{run_dir}: unreadable training run ({type(error).__name__}: {error})") from None
    if record.get("format_version", 0) > RUN_FORMAT_VERSION:
        raise InspectError(f"{record_path}: made by a newer edge-inspect (run format {record['format_version']})")
    spec = model_kind(record.get("model"), source=record_path)
    model = spec.restore(spec.config.from_dict(record["config"]), state)
    # the normalisation the model was fitted with, also for runs from before it was a setting
    model.image_input = ImageInput(Normalization(tuple(record["normalization"]["mean"]), tuple(record["normalization"]["std"])))
    return model.eval(), record
