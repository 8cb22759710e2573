"""Evaluate a bundle on a labelled test set through the runtime: image AUROC, pixel AUROC, AUPRO, F1-max and
the verdicts at the calibrated threshold, per defect type and overall."""

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edgeinspect.runtime.console import InspectError, progress_bar
from edgeinspect.runtime.datasets import GOOD, Dataset, TestSample
from edgeinspect.runtime.inference.bundle import Bundle
from edgeinspect.runtime.inference.inspector import Inspector

from .metrics import at_threshold, aupro, auroc, f1_max


def read_mask(sample: TestSample, image_shape: tuple[int, int], map_shape: tuple[int, int]) -> np.ndarray:
    """Ground truth as a bool array at the map's size (the image was stretched to it, whatever its shape); good
    images and images without a mask are all-False."""
    if sample.mask is None:
        return np.zeros(map_shape, dtype=bool)
    if not sample.mask.is_file():
        raise InspectError(f"{sample.mask}: mask missing for the defective test image {sample.path}")
    try:
        mask = cv2.imread(str(sample.mask), cv2.IMREAD_GRAYSCALE)
    except cv2.error:
        mask = None
    if mask is None:
        raise InspectError(f"{sample.mask}: not a readable mask image")
    if mask.shape != image_shape:
        raise InspectError(f"{sample.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {sample.path} "
                           f"is {image_shape[1]}x{image_shape[0]}")
    # the mask pixel under each map pixel's centre: never interpolated into grey, never shifted by half a pixel
    return cv2.resize(mask, map_shape[::-1], interpolation=cv2.INTER_NEAREST_EXACT) > 0


@dataclass
class Predictions:
    """What the bundle said about every readable test image (masks only where the data set has them)."""

    paths: list[Path]
    types: np.ndarray
    scores: np.ndarray
    maps: np.ndarray  # (N, H, W) at the model's input size
    masks: np.ndarray | None

    @property
    def labels(self) -> np.ndarray:
        return self.types != GOOD


def predict(bundle: Bundle, dataset: Dataset, batch_size: int = 8, backend="auto", precision: str = "auto"
            ) -> Predictions:
    if not dataset.test:
        raise InspectError(f"--data {dataset.name}: no test images (an MVTec AD layout has test/<type>/)")
    if batch_size < 1:
        raise InspectError(f"--batch-size must be at least 1, got {batch_size}")
    dataset.check_masks()  # before any inference: a missing mask would be scored as all-good pixels
    inspector = Inspector(bundle, backend, precision=precision)
    by_path = {sample.path: sample for sample in dataset.test}
    with_masks = dataset.has_masks
    paths, types, scores, maps, masks = [], [], [], [], []
    with progress_bar() as bar:
        task = bar.add_task("evaluating", total=len(by_path))
        for path, image, anomaly_map, score in inspector.infer_files(
                list(by_path), batch_size, progress=lambda n: bar.advance(task, n)):
            sample = by_path[path]
            paths.append(path)
            types.append(sample.defect_type)
            scores.append(score)
            maps.append(anomaly_map)
            if with_masks:
                masks.append(read_mask(sample, image.shape[:2], anomaly_map.shape))
    return Predictions(paths, np.array(types), np.array(scores), np.stack(maps),
                       np.stack(masks) if with_masks else None)


def evaluate(bundle: Bundle, predictions: Predictions, dataset_name: str) -> dict:
    """Metrics overall and per defect type (each type against all good images)."""
    types = predictions.types
    groups = {"overall": np.ones(len(types), dtype=bool)}
    groups.update({t: (types == t) | (types == GOOD) for t in sorted(set(types) - {GOOD})})
    threshold = (bundle.thresholds or {}).get("image", {}).get("threshold")
    results = {name: _group_metrics(predictions.labels[keep], predictions.scores[keep], predictions.maps,
                                    predictions.masks, keep, threshold)
               for name, keep in groups.items()}
    return {"dataset": dataset_name, "bundle": str(bundle.path), "n_images": int(len(types)),
            "image_threshold": threshold, "metrics": results}


def _group_metrics(labels, scores, maps, masks, keep, threshold) -> dict:
    metrics = {"n_good": int((~labels).sum()), "n_defective": int(labels.sum()),
               "image_auroc": auroc(labels, scores)}
    if labels.any():
        metrics["f1_max"] = f1_max(labels, scores)["f1"]
    if threshold is not None:
        metrics["at_threshold"] = at_threshold(labels, scores, threshold)
    if masks is not None:
        metrics["pixel_auroc"] = auroc(masks[keep], maps[keep])
        metrics["aupro"] = aupro(maps[keep], masks[keep])
    return metrics


def metrics_rows(result: dict) -> list[list[str]]:
    """Table rows: group, n, image AUROC, pixel AUROC, AUPRO, F1-max, precision, recall, accuracy."""
    def cell(value):
        return "-" if value is None else f"{value:.3f}"

    rows = []
    for name, m in result["metrics"].items():
        verdicts = m.get("at_threshold", {})
        rows.append([name, str(m["n_good"] + m["n_defective"])] + [cell(m.get(k)) for k in (
            "image_auroc", "pixel_auroc", "aupro", "f1_max")] + [cell(verdicts.get(k)) for k in (
            "precision", "recall", "accuracy")])
    return rows


METRIC_COLUMNS = ["set", "images", "image AUROC", "pixel AUROC", "AUPRO", "F1-max", "precision", "recall", "accuracy"]
