"""The model kinds inspect-train can fit and inspect-export can restore, by the name stored in run.json.

Each kind is a configuration dataclass, a `fit(config, fit_images, validation_images, weights, bar,
checkpoint, device) → (model, config used, details)` and a `restore(config, state_dict) → model`. `fit`
computes on `device` (not part of the configuration: it does not change the model) and returns the model on
the CPU, where the run folder and export expect it. Every model maps uint8 RGB images (B, H, W, 3) to
anomaly_map (B, 1, H, W) and score (B,), so export, calibration, the runtime and evaluation never need to
know which one they hold.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeinspect.runtime.console import InspectError

from . import autoencoder, dfr, patchcore, stpm
from .configs import ModelConfig


@dataclass(frozen=True)
class ModelKind:
    config: type[ModelConfig]
    fit: Callable
    restore: Callable


MODEL_KINDS: dict[str, ModelKind] = {
    "patchcore": ModelKind(patchcore.PatchCoreConfig, patchcore.fit_patchcore, patchcore.restore_patchcore),
    "stpm": ModelKind(stpm.STPMConfig, stpm.fit_stpm, stpm.restore_stpm),
    "dfr": ModelKind(dfr.DFRConfig, dfr.fit_dfr, dfr.restore_dfr),
    "autoencoder": ModelKind(autoencoder.AutoencoderConfig, autoencoder.fit_autoencoder,
                             autoencoder.restore_autoencoder),
}


def model_kind(name: str, source: Path | None = None) -> ModelKind:
    if name not in MODEL_KINDS:
        where = f"{source}: " if source else ""
        raise InspectError(f"{where}unknown model kind {name!r} (known: {', '.join(MODEL_KINDS)})")
    return MODEL_KINDS[name]
