"""Reading and resizing images: the one definition of preprocessing shared by training and deployment.

Everything else (scaling to float, mean/std normalisation, channel order for the network) is inside the
exported graph, so the per-frame CPU work on the edge box is a colour conversion and one resize.
"""

import functools
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from edgeinspect.runtime.console import InspectError, warn

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


MAX_IMAGE_PIXELS = 1 << 27  # 134 million pixels (11585 × 11585): larger files are refused before decoding
MAX_IMAGE_SIDE = 1 << 16  # pixels per side
PIXEL_TYPES = (np.uint8, np.uint16)
CHANNELS = (1, 3, 4)


def _header_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file's header without decoding it (Pillow reads headers lazily), or None where
    Pillow does not know the format (OpenCV may still decode it, within its own size limit)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                return image.size
        except Image.DecompressionBombError:  # over twice Pillow's limit, which is above ours
            raise InspectError(f"{path}: image is too large (over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} "
                               f"million pixels; at most {MAX_IMAGE_PIXELS / 1e6:.0f} million, {MAX_IMAGE_SIDE} "
                               "per side)") from None
        except Exception:  # not a format Pillow reads, or a broken header: OpenCV decides below
            return None


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); raises InspectError naming the file when it is not a readable image: not a file,
    undecodable, larger than MAX_IMAGE_PIXELS or MAX_IMAGE_SIDE (checked from the header, before anything is
    allocated), or of a pixel type other than 8- or 16-bit with 1, 3 or 4 channels."""
    path = Path(path)
    if not path.is_file():
        raise InspectError(f"{path}: not a readable image (no such file)")
    size = _header_size(path)
    if size is not None:
        width, height = size
        if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
            raise InspectError(f"{path}: image of {width}×{height} pixels is too large (at most "
                               f"{MAX_IMAGE_PIXELS / 1e6:.0f} million pixels, {MAX_IMAGE_SIDE} per side)")
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
        frame = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    except (OSError, MemoryError, cv2.error) as error:
        reason = str(error).strip().splitlines()[-1][:120] if str(error).strip() else type(error).__name__
        raise InspectError(f"{path}: not a readable image ({reason})") from None
    if frame is None or frame.size == 0:
        raise InspectError(f"{path}: not a readable image")
    channels = 1 if frame.ndim == 2 else frame.shape[2] if frame.ndim == 3 else 0
    if frame.dtype not in PIXEL_TYPES or channels not in CHANNELS:
        raise InspectError(f"{path}: unsupported pixel type ({frame.dtype}, {channels} channel(s)); edge-inspect "
                           "reads 8- or 16-bit images with 1, 3 or 4 channels")
    if frame.ndim == 3 and channels == 1:
        frame = frame[:, :, 0]
    return to_rgb(frame)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an RGB uint8 (H, W, 3) image to size=(height, width) with antialiased bilinear filtering (Pillow's,
    the filter of torchvision's Resize): it keeps 0.0003 pixel AUROC and 0.002 AUPRO on MVTec AD bottle over
    OpenCV's area averaging.

    When both sides shrink by whole factors (a 512×512 camera frame to 256×256) the same triangle filter runs
    in OpenCV, within 1 grey level of Pillow and several times faster (see _shrink_by_whole_factors)."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    if image.shape[0] % height == 0 and image.shape[1] % width == 0:
        return _shrink_by_whole_factors(image, height, width)
    return np.array(Image.fromarray(image).resize((width, height), Image.Resampling.BILINEAR))


@functools.lru_cache(maxsize=32)
def triangle_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's antialiased bilinear weights along one axis, (size_out, size_in): a triangle as wide as the
    scale around each output pixel's centre, cut at the image's edges and renormalised; the outputs that
    were cut, and the input lines those read."""
    scale = size_in / size_out
    support = max(scale, 1.0)
    centres = (np.arange(size_out) + 0.5) * scale
    first = (centres - support + 0.5).astype(int)  # truncated towards zero, as Pillow's C does
    stop = (centres + support + 0.5).astype(int)
    x = np.arange(size_in)
    weights = np.clip(1 - np.abs((x[None] - centres[:, None] + 0.5) / support), 0, None)
    weights[(x[None] < first[:, None]) | (x[None] >= stop[:, None])] = 0
    weights = (weights / weights.sum(1, keepdims=True)).astype(np.float32)
    edges = np.nonzero((centres - support + 0.5 < 0) | (stop > size_in))[0]
    return weights, edges, np.nonzero(weights[edges].any(0))[0]


def _prefilter(factor: int) -> np.ndarray:
    """The filter that, followed by averaging factor×factor blocks, makes the triangle of a whole factor:
    box_f for odd f, [½, ½] ⊛ box_f for even f (f=2: [¼, ½, ¼] then 2×2 means gives ⅛·[1, 3, 3, 1])."""
    box = np.full(factor, 1 / factor)
    return (box if factor % 2 else np.convolve([0.5, 0.5], box)).astype(np.float32)


def _shrink_by_whole_factors(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Triangle filter by whole factors: a small separable prefilter and OpenCV's block averaging (INTER_AREA)
    inside; the outputs at the edges, where Pillow cuts the triangle, computed exactly from its weights."""
    rows, edge_rows, used_rows = triangle_weights(image.shape[0], height)
    cols, edge_cols, used_cols = triangle_weights(image.shape[1], width)
    factors = (image.shape[0] // height, image.shape[1] // width)
    if factors == (2, 2):  # the common case: OpenCV's fixed-point 3×3 Gaussian is exactly [¼, ½, ¼] and twice as fast
        smoothed = cv2.GaussianBlur(image, (3, 3), 0, borderType=cv2.BORDER_REPLICATE)
    else:
        smoothed = cv2.sepFilter2D(image, -1, _prefilter(factors[1]), _prefilter(factors[0]), delta=1e-3,
                                   borderType=cv2.BORDER_REPLICATE)  # delta: round halves up, as Pillow does
    result = cv2.resize(smoothed, (width, height), interpolation=cv2.INTER_AREA)
    top_bottom = np.tensordot(rows[edge_rows][:, used_rows], image[used_rows].astype(np.float32), axes=(1, 0))
    result[edge_rows] = _rounded(np.tensordot(cols, top_bottom, axes=(1, 1)).transpose(1, 0, 2))
    left_right = np.tensordot(image[:, used_cols].astype(np.float32), cols[edge_cols][:, used_cols], axes=(1, 1))
    result[:, edge_cols] = _rounded(np.tensordot(rows, left_right, axes=(1, 0)).transpose(0, 2, 1))
    return result


def _rounded(values: np.ndarray) -> np.ndarray:
    return np.floor(values + 0.5).clip(0, 255).astype(np.uint8)


def list_images(folder: Path) -> list[Path]:
    """Sorted regular files of a folder (not hidden); a missing or empty folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InspectError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InspectError(f"{folder}: folder holds no images")
    return files


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
