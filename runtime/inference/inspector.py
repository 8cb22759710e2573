"""Run a bundle on images: resize on the CPU, everything else in the graph; verdicts and regions from the
calibrated thresholds."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from threadpoolctl import threadpool_limits

from edgeinspect.runtime.console import InspectError, warn
from edgeinspect.runtime.inference.backends import PRECISIONS, open_backend
from edgeinspect.runtime.inference.bundle import Bundle
from edgeinspect.runtime.inference.images import decodable, resize
from edgeinspect.runtime.inference.regions import Region, find_regions


@dataclass
class Inspection:
    score: float
    anomaly_map: np.ndarray  # (H, W) at the model's input size
    verdict: str | None = None  # "OK" / "NG"; None before calibration
    regions: list[Region] = field(default_factory=list)


def choose_precision(bundle: Bundle, asked: str = "auto", calibrating: bool = False) -> str:
    """fp32 or int8. `auto`: what the thresholds were calibrated for, else (not calibrated yet, or calibrating)
    int8 where the bundle has an INT8 model. Scores of the two differ, so a precision other than the thresholds'
    is refused, never run against them."""
    if asked not in ("auto", *PRECISIONS):
        raise InspectError(f"--precision {asked!r} is not one of auto, {', '.join(PRECISIONS)}")
    has_int8 = bool(bundle.record.get("int8_model_file"))
    calibrated = (bundle.thresholds or {}).get("precision", "fp32") if bundle.thresholds else None
    if asked == "auto":
        return calibrated if calibrated and not calibrating else "int8" if has_int8 else "fp32"
    if asked == "int8" and not has_int8:
        raise InspectError(f"--precision int8: {bundle.path} has no INT8 model (inspect-export {bundle.path} --int8)")
    if calibrated and calibrated != asked and not calibrating:
        raise InspectError(f"--precision {asked}: {bundle.path}'s thresholds were calibrated for {calibrated}, and the "
                           f"scores of the two differ; calibrate for {asked} first (inspect-calibrate {bundle.path} "
                           f"--precision {asked}) or run {calibrated}")
    return asked


class Inspector:
    def __init__(self, bundle: Bundle, backend="auto", threads: int | None = None, precision: str = "auto",
                 calibrating: bool = False):
        """backend: a backend name (see open_backend), or any callable with a backend's contract, such as
        the PyTorch model a benchmark compares against.

        numpy's BLAS is held to one thread for the process: its threads spin after each product (the resize's
        edge pixels) on the cores the backend computes on, which made every frame's inference up to 70% slower."""
        threadpool_limits(1, user_api="blas")
        self.bundle = bundle
        self.size = bundle.input_size
        self.version = (bundle.record.get("version") or {}).get("number", 1)  # inspect-teach's versions
        self.precision = choose_precision(bundle, precision, calibrating)
        self.backend = open_backend(bundle, backend, threads, self.precision) if isinstance(backend, str) else backend
        thresholds = bundle.thresholds or {}
        self.image_threshold = thresholds.get("image", {}).get("threshold")
        self.pixel_threshold = thresholds.get("pixel", {}).get("threshold")
        # the least and the most height / width among the training images (bundles from before: unknown)
        self.trained_aspects = ((bundle.record.get("training") or {}).get("input_geometry") or {}).get("aspect_range")

    def prepare(self, image_rgb: np.ndarray) -> np.ndarray:
        """The frame stretched to the model's input whatever its aspect, as every training image was; the first
        frame whose aspect lies well outside the training images' is named in a warning."""
        if self.trained_aspects:
            self._warn_on_unfamiliar_aspect(*image_rgb.shape[:2])
        return resize(image_rgb, self.size)

    def _warn_on_unfamiliar_aspect(self, height: int, width: int, slack: float = 1.1) -> None:
        low, high = self.trained_aspects
        if low / slack <= height / width <= high * slack:
            return
        warn(f"frames of {width}×{height} (height/width {height / width:.2f}) are unlike the training images "
             f"({low:.2f} to {high:.2f}): each is stretched to the model's {self.size[1]}×{self.size[0]} as in "
             "training, which distorts the part; train on frames of this framing, or crop them to it")
        self.trained_aspects = None  # once

    def infer(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, H, W, 3) at the input size → maps (B, H, W), scores (B,)."""
        return self.backend(np.ascontiguousarray(batch))

    def judge(self, score: float, anomaly_map: np.ndarray) -> Inspection:
        if self.image_threshold is None:
            return Inspection(score, anomaly_map)
        verdict = "NG" if not score <= self.image_threshold else "OK"  # a NaN score fails safe: NG
        regions = find_regions(anomaly_map, self.pixel_threshold) if verdict == "NG" else []
        return Inspection(score, anomaly_map, verdict, regions)

    def infer_files(self, paths: list[Path], batch_size: int = 8, progress=None
                    ) -> Iterator[tuple[Path, np.ndarray, np.ndarray, float]]:
        """(path, original RGB image, map, score) per readable file; unreadable files are skipped with a warning."""
        readable = 0
        for start in range(0, len(paths), batch_size):
            loaded = list(decodable(paths[start:start + batch_size]))
            if loaded:
                maps, scores = self.infer(np.stack([self.prepare(image) for _, image in loaded]))
                readable += len(loaded)
                for (path, image), anomaly_map, score in zip(loaded, maps, scores):
                    yield path, image, anomaly_map, float(score)
            if progress is not None:
                progress(len(paths[start:start + batch_size]))
        if not readable:
            raise InspectError(f"none of the {len(paths)} files could be read as images")
