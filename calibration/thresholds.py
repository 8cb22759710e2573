"""μ + k·σ thresholds from scores of held-out good images, measured through the bundle itself."""

from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from edgeinspect.runtime.bundle import Bundle
from edgeinspect.runtime.console import InspectError, progress_bar, warn
from edgeinspect.runtime.inspector import Inspector

MIN_IMAGES = 10


class RunningMoments:
    """Mean and standard deviation of a stream of arrays, in float64, without keeping the values."""

    def __init__(self):
        self.n, self.total, self.total_sq = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        self.n += values.size
        self.total += values.sum()
        self.total_sq += (values**2).sum()

    def summary(self, k: float) -> dict:
        mean = self.total / self.n
        std = float(np.sqrt(max(self.total_sq / self.n - mean**2, 0.0)))
        return {"n": self.n, "mean": mean, "std": std, "k": k, "threshold": mean + k * std}


def calibrate(bundle: Bundle, images: list[Path], k: float = 3.0, source: str = "validation") -> dict:
    """Store image and pixel thresholds at μ + k·σ in bundle.json (atomically) and return them."""
    if k <= 0:
        raise InspectError(f"--k must be positive, got {k}")
    inspector = Inspector(bundle)
    image_scores, pixels = RunningMoments(), RunningMoments()
    with progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(images))
        for _, _, anomaly_map, score in inspector.infer_files(images, progress=lambda n: bar.advance(task, n)):
            image_scores.add(score)
            pixels.add(anomaly_map)
    if image_scores.n < MIN_IMAGES:
        warn(f"only {image_scores.n} good images for calibration: the μ+{k:g}σ threshold is a rough estimate; "
             f"use at least {MIN_IMAGES}")
    thresholds = {
        "method": "mean+k*std",
        "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "image": image_scores.summary(k),
        "pixel": {**pixels.summary(k), "n_images": image_scores.n},
    }
    bundle.record["thresholds"] = thresholds
    bundle.save()
    return thresholds
