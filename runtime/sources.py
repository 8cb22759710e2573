"""Frame sources through OpenCV: an image folder, a video file, a stream URL or a camera index."""

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .console import InspectError, warn
from .datasets import BUILTIN_DATASETS, open_dataset
from .images import list_images, read_image, to_rgb


def open_frames(source: str) -> Iterator[tuple[str, np.ndarray]]:
    """(name, RGB frame) per frame; the name is the file name for folders, the frame number otherwise.
    A built-in data set name (elpv) plays its held-out test images."""
    if source in BUILTIN_DATASETS:
        return _files([sample.path for sample in open_dataset(source).test])
    if source.isdigit():
        return _capture(int(source), f"--camera {source}")
    path = Path(source)
    if path.is_dir():
        return _files(list_images(path))
    if path.is_file() or "://" in source:
        return _capture(source, f"--source {source}")
    raise InspectError(f"--source {source}: no such file, folder or camera")


def _files(paths: list[Path]) -> Iterator[tuple[str, np.ndarray]]:
    for path in paths:
        try:
            yield path.name, read_image(path)
        except InspectError as error:
            warn(f"skipped {error}")


def _capture(target, option: str) -> Iterator[tuple[str, np.ndarray]]:
    capture = cv2.VideoCapture(target)
    if not capture.isOpened():
        raise InspectError(f"{option}: could not be opened (not connected, busy, or not a video OpenCV can read)")
    return _read_capture(capture)


def _read_capture(capture) -> Iterator[tuple[str, np.ndarray]]:
    index = 0
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                return
            yield str(index), to_rgb(frame)
            index += 1
    finally:
        capture.release()
