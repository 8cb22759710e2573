"""Reading and resizing images: the one definition of preprocessing shared by training and deployment.

Everything else (scaling to float, mean/std normalisation, channel order for the network) is inside the
exported graph, so the per-frame CPU work on the edge box is a colour conversion and one resize.
"""

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from .console import InspectError, warn

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def to_rgb(frame: np.ndarray) -> np.ndarray:
    """OpenCV's BGR, BGRA or grayscale frame → RGB uint8 (H, W, 3); grayscale is replicated to 3 channels."""
    if frame.dtype == np.uint16:
        frame = (frame >> 8).astype(np.uint8)
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); raises InspectError naming the file when it is not a readable image."""
    data = np.fromfile(str(path), dtype=np.uint8) if Path(path).is_file() else None
    frame = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data is not None and data.size else None
    if frame is None:
        raise InspectError(f"{path}: not a readable image")
    return to_rgb(frame)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 (H, W, 3) image to size=(height, width) with antialiased bilinear filtering (Pillow's,
    the filter of torchvision's Resize): it keeps 0.0003 pixel AUROC and 0.002 AUPRO on MVTec AD bottle over
    OpenCV's area averaging, at the same speed."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


def list_images(folder: Path) -> list[Path]:
    """Sorted regular files of a folder (not hidden); a missing or empty folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InspectError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InspectError(f"{folder}: folder holds no images")
    return files


def readable_images(paths: list[Path]) -> list[Path]:
    """The paths that decode as images; the others are named in a warning."""
    return [path for path, _ in decodable(paths)]


def decodable(paths: list[Path], progress=None):
    """(path, RGB image) for each path that decodes; the others are named in a warning. `progress(1)` per path."""
    for path in paths:
        try:
            yield path, read_image(path)
        except InspectError as error:
            warn(f"skipped {error}")
        if progress is not None:
            progress(1)


def load_resized(paths: list[Path], size: tuple[int, int], progress=None) -> tuple[np.ndarray, list[Path]]:
    """Read and resize images into one uint8 (N, H, W, 3) array; unreadable files are skipped with a warning.

    Returns the array and the paths that were read; fails when none could be read. `progress(1)` per file.
    """
    images, kept = [], []
    for path, image in decodable(paths, progress):
        images.append(resize(image, size))
        kept.append(path)
    if not images:
        raise InspectError(f"none of the {len(paths)} files could be read as images")
    return np.stack(images), kept
