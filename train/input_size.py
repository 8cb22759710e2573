"""The model's input size chosen from the training images (``--image-size auto``, the default).

- Aspect: the images' median height / width; square where at least a quarter of them are portrait and a quarter
  landscape (no one aspect fits such a set, and a square distorts both alike); bounded to 1:8.
- Pixels: as many as the smallest quarter of the images have, so three in four are not upscaled (for images all
  of one size: theirs), at least PIXEL_FLOOR and at most PIXEL_BUDGET.
- Sides: rounded down to whole multiples of the model's deepest stride.

The floor, the budget and the quartiles were chosen by measurement: BENCHMARKS.md, "The input's size from the
data"."""

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.inference.images import read_image

PIXEL_BUDGET = 448 * 448  # 3.1× the pixels of 256×256, and about that per frame (the bank's size is bounded)
PIXEL_FLOOR = 256 * 256  # smaller images are upscaled to this: ImageNet backbones see parts at about 224 px
MAX_ASPECT = 8.0  # longer images are stretched to at most this aspect, so the short side keeps a few patches


@dataclass(frozen=True)
class InputGeometry:
    """What inspect-train chose and from what: recorded in run.json and bundle.json."""

    size: tuple[int, int]  # (height, width) of the model input
    reason: str
    images: int  # training images whose size was read
    median_size: tuple[int, int]  # (height, width): the median of each
    aspect: float  # the aspect (height / width) chosen, before rounding to whole strides
    aspect_range: tuple[float, float]  # the least and the most height / width among the images

    def to_dict(self) -> dict:
        return asdict(self)


def image_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    """(height, width) of each image from its header, decoded only where Pillow does not read the format; files
    that are not readable images are left out (reading the images for training names them)."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.append(image.size[::-1])
        except Exception:
            try:
                sizes.append(read_image(path).shape[:2])
            except InspectError:
                continue
    return sizes


def choose_aspect(aspects: np.ndarray) -> tuple[float, str]:
    """Height / width for the input, and why."""
    low, median, high = np.quantile(aspects, [0.25, 0.5, 0.75])
    if low < 1 < high:
        return 1.0, f"square: portrait and landscape images (quartiles of height/width {low:.2f} and {high:.2f})"
    bounded = min(max(float(median), 1 / MAX_ASPECT), MAX_ASPECT)
    if bounded == 1:
        return 1.0, "square"
    return bounded, f"aspect {median:.2f}" + (f", bounded to {bounded:.2f}" if bounded != median else "")


def choose_input_size(sizes: list[tuple[int, int]], step: int, budget: int = PIXEL_BUDGET,
                      floor: int = PIXEL_FLOOR) -> InputGeometry:
    """The input for images of `sizes` ((height, width) each), with sides in multiples of `step`."""
    if not sizes:
        raise InspectError("none of the training images could be read as images")
    heights, widths = np.array(sizes, dtype=float).T
    aspects = heights / widths
    aspect, shape = choose_aspect(aspects)
    pixels = float(np.quantile(heights * widths, 0.25))
    area = min(max(pixels, floor), budget)
    size = tuple(max(step, int(side // step) * step) for side in (math.sqrt(area * aspect), math.sqrt(area / aspect)))
    if pixels > budget:
        scale = f"downscaled {math.sqrt(pixels / (size[0] * size[1])):.2g}× to within the budget of {budget} pixels"
    elif pixels < floor:
        scale = f"upscaled {math.sqrt(size[0] * size[1] / pixels):.2g}× to the floor of {floor} pixels"
    else:
        scale = "at their own resolution"
    median_size = (int(np.median(heights)), int(np.median(widths)))
    many = "the smallest quarter of the " if np.ptp(heights * widths) else ""
    reason = (f"{len(sizes)} training images of median size {median_size[0]}×{median_size[1]}; {shape}; "
              f"{many}images {scale}; sides in multiples of {step}")
    return InputGeometry(size, reason, len(sizes), median_size, round(aspect, 4),
                         (round(float(aspects.min()), 4), round(float(aspects.max()), 4)))
