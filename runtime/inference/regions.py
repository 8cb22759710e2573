"""Anomalous regions of a thresholded map, and the overlay a person looks at."""

from dataclasses import asdict, dataclass

import cv2
import numpy as np
from scipy import ndimage


@dataclass
class Region:
    x: int
    y: int
    width: int
    height: int
    area: int  # pixels at the model's input size
    peak: float

    def to_dict(self) -> dict:
        return asdict(self)


def find_regions(anomaly_map: np.ndarray, threshold: float) -> list[Region]:
    """Connected components of map > threshold, largest first. Areas and peaks come from numpy's bincount
    and maximum.at: ndimage's per-label sum and maximum made it 2.7 instead of 0.95 ms on bottle's maps."""
    labels, count = ndimage.label(anomaly_map > threshold)
    if count == 0:
        return []
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=count + 1)
    peaks = np.full(count + 1, -np.inf, anomaly_map.dtype)
    np.maximum.at(peaks, flat, anomaly_map.ravel())
    regions = [
        Region(s[1].start, s[0].start, s[1].stop - s[1].start, s[0].stop - s[0].start, int(areas[i]), float(peaks[i]))
        for i, s in enumerate(ndimage.find_objects(labels), start=1)
    ]
    return sorted(regions, key=lambda r: -r.area)


def heat_overlay(image_rgb: np.ndarray, anomaly_map: np.ndarray, threshold: float | None) -> np.ndarray:
    """BGR image for cv2.imwrite: the map as a heat map over the image, regions above threshold outlined.

    With a threshold the colour scale is fixed (threshold at its middle) so frames compare; without, it is
    stretched per image."""
    height, width = image_rgb.shape[:2]
    scaled = cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)
    if threshold is not None and threshold > 0:
        norm = np.clip(scaled / (2 * threshold), 0, 1)
    else:
        norm = (scaled - scaled.min()) / (np.ptp(scaled) or 1.0)
    heat = cv2.applyColorMap((norm * 255).astype(np.uint8), cv2.COLORMAP_JET)
    overlay = cv2.addWeighted(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), 0.6, heat, 0.4, 0)
    if threshold is not None:
        contours, _ = cv2.findContours((scaled > threshold).astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(overlay, contours, -1, (255, 255, 255), max(1, width // 300))
    return overlay
