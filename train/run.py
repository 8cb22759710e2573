"""A training run folder: ``model.pt`` (tensors only, no pickled classes) and ``run.json`` (the model kind,
its configuration, and which good images were fitted on and which were held out for calibration)."""

import io
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from edgeinspect.runtime.console import InspectError, progress_bar
from edgeinspect.runtime.datasets import Dataset, split_fit_validation
from edgeinspect.runtime.files import atomic_write_bytes, atomic_write_json
from edgeinspect.runtime.images import load_resized, readable_images

from .patchcore import (MemoryBank, PatchCore, PatchCoreConfig, bank_neighbours, build_patchcore, extract_patches,
                        greedy_coreset, random_projection)

RUN_FORMAT_VERSION = 1
RUN_RECORD = "run.json"
RUN_WEIGHTS = "model.pt"


def train_patchcore(config: PatchCoreConfig, dataset: Dataset, out: Path, val_fraction: float = 0.2,
                    weights: Path | None = None) -> dict:
    """Fit PatchCore on the fit split of the good images and write the run folder; returns the run record."""
    if not 0 < config.coreset_ratio <= 1:
        raise InspectError(f"--coreset-ratio must be in (0, 1], got {config.coreset_ratio}")
    fit_paths, validation_paths = split_fit_validation(dataset.good, val_fraction, config.seed)
    validation_paths = readable_images(validation_paths)  # calibration must not discover bad files later
    timings = {}
    started = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task("reading good images", total=len(fit_paths))
        images, fit_paths = load_resized(fit_paths, config.image_size, lambda n: bar.advance(task, n))
        timings["read_images_s"] = time.perf_counter() - started

        model = build_patchcore(config, torch.zeros(1, 1), torch.zeros(1, 1), weights)
        task = bar.add_task("patch features", total=len(images))
        clock = time.perf_counter()
        patches = extract_patches(model, images, progress=lambda n: bar.advance(task, n))
        timings["features_s"] = time.perf_counter() - clock

        size = max(1, round(config.coreset_ratio * len(patches)))
        task = bar.add_task(f"coreset {size} of {len(patches)} patches", total=size)
        clock = time.perf_counter()
        projected = random_projection(patches, config.projection_dim, config.seed)
        chosen = greedy_coreset(projected, size, config.seed, progress=lambda n: bar.advance(task, n))
        bar.update(task, completed=size)
        timings["coreset_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    bank = patches[chosen].contiguous()
    model.memory = MemoryBank(bank, bank_neighbours(bank, config.num_neighbours))
    timings["neighbours_s"] = time.perf_counter() - clock
    timings["total_s"] = time.perf_counter() - started
    record = {
        "format_version": RUN_FORMAT_VERSION,
        "model": "patchcore",
        "config": config.to_dict(),
        "normalization": model.image_input.normalization.to_dict(),
        "data": _data_summary(dataset, fit_paths, validation_paths),
        "memory_bank": {"entries": int(bank.shape[0]), "dim": int(bank.shape[1]), "patches": int(len(patches))},
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    save_run(out, model, record)
    return record


def _data_summary(dataset: Dataset, fit: list[Path], validation: list[Path]) -> dict:
    return {
        "name": dataset.name,
        "n_fit": len(fit),
        "n_validation": len(validation),
        "fit": [str(Path(p).resolve()) for p in fit],
        "validation": [str(Path(p).resolve()) for p in validation],
    }


def save_run(out: Path, model: torch.nn.Module, record: dict) -> None:
    """Weights first, then the record that names them: a run folder with a run.json is always complete."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(Path(out) / RUN_WEIGHTS, buffer.getvalue())
    atomic_write_json(Path(out) / RUN_RECORD, record)


def load_run(run_dir: Path) -> tuple[PatchCore, dict]:
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
    if record.get("model") != "patchcore":
        raise InspectError(f"{record_path}: unknown model kind {record.get('model')!r}")
    config = PatchCoreConfig.from_dict(record["config"])
    model = build_patchcore(config, state["memory.bank"], state["memory.neighbours"], pretrained=False)
    model.load_state_dict(state)
    return model.eval(), record
