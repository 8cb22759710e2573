"""Frame sources: an image folder (optionally watched for new files), a video file, a stream URL, a camera
index or a GStreamer pipeline (Jetson CSI cameras; needs an OpenCV built with GStreamer, as JetPack's is).

Live sources (cameras, streams, pipelines) that disconnect or stall are reopened with back-off, and the
run goes on; files end when they end."""

from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from .console import InspectError, warn
from .datasets import BUILTIN_DATASETS, open_dataset
from .images import IMAGE_SUFFIXES, list_images, read_image, to_rgb

BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 10.0


class FrameSource:
    """Iterable of (name, RGB frame); `live` says whether frames keep coming whatever we do (a camera)."""

    live = False

    def __init__(self, description: str):
        self.description = description
        self.reconnects = 0

    def frames(self, stop) -> Iterator[tuple[str, np.ndarray]]:
        raise NotImplementedError


class FolderSource(FrameSource):
    def __init__(self, paths: list[Path], folder: Path | None = None, watch: bool = False, poll_s: float = 0.5):
        super().__init__(str(folder) if folder else "image list")
        self.paths, self.folder, self.watch, self.poll_s = paths, folder, watch, poll_s

    def frames(self, stop) -> Iterator[tuple[str, np.ndarray]]:
        seen = set()
        pending = list(self.paths)
        while not stop.is_set():
            for path in pending:
                seen.add(path)
                try:
                    yield path.name, read_image(path)
                except InspectError as error:
                    warn(f"skipped {error}")
                if stop.is_set():
                    return
            if not self.watch:
                return
            stop.wait(self.poll_s)
            pending = sorted(p for p in self.folder.iterdir()
                             if p not in seen and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


class CaptureSource(FrameSource):
    """OpenCV VideoCapture on a file, URL, camera index or GStreamer pipeline."""

    def __init__(self, target, option: str, live: bool, api: int = cv2.CAP_ANY, loop: bool = False):
        super().__init__(option)
        self.target, self.option, self.live, self.api, self.loop = target, option, live, api, loop
        self.capture = self._open()
        if self.capture is None:
            raise InspectError(f"{option}: could not be opened (not connected, busy, or not a video OpenCV can read)")

    def _open(self):
        capture = cv2.VideoCapture(self.target, self.api)
        if capture.isOpened():
            return capture
        capture.release()
        return None

    def frames(self, stop) -> Iterator[tuple[str, np.ndarray]]:
        index, backoff = 0, BACKOFF_START_S
        try:
            while not stop.is_set():
                ok, frame = self.capture.read() if self.capture is not None else (False, None)
                if ok:
                    backoff = BACKOFF_START_S
                    yield str(index), to_rgb(frame)
                    index += 1
                    continue
                if not self.live:
                    if not self.loop or index == 0:
                        return
                    self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0)  # play the file again
                    continue
                if self.capture is not None:
                    self.capture.release()
                    warn(f"{self.option}: no frame (disconnected or stalled); reopening")
                stop.wait(backoff)
                backoff = min(2 * backoff, BACKOFF_MAX_S)
                self.capture = self._open()
                if self.capture is not None:
                    self.reconnects += 1
                    warn(f"{self.option}: reconnected ({self.reconnects} so far)")
        finally:
            if self.capture is not None:
                self.capture.release()


def open_source(source: str, watch: bool = False, loop: bool = False) -> FrameSource:
    """Resolve --source: a built-in data set name (elpv plays its held-out test images), a camera index, a
    GStreamer pipeline (contains '!'), a folder (`watch`: keep taking new files), a video file (`loop`: play
    it again at its end) or a stream URL."""
    if source in BUILTIN_DATASETS:
        return FolderSource([sample.path for sample in open_dataset(source).test])
    if source.isdigit():
        return CaptureSource(int(source), f"--camera {source}", live=True)
    if "!" in source:
        return CaptureSource(source, "--source (GStreamer pipeline)", live=True, api=cv2.CAP_GSTREAMER)
    path = Path(source)
    if path.is_dir():
        return FolderSource(list_images(path) if not watch else sorted(
            p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES), path, watch)
    if "://" in source:
        return CaptureSource(source, f"--source {source}", live=True)
    if path.is_file():
        return CaptureSource(source, f"--source {source}", live=False, loop=loop)
    raise InspectError(f"--source {source}: no such file, folder or camera")
