"""Frame sources: an image folder (optionally watched for new files), a video file, a stream URL, a camera
index or a GStreamer pipeline (Jetson CSI cameras; needs an OpenCV built with GStreamer, as JetPack's is).

Live sources (cameras, streams, pipelines) that disconnect or stall are reopened with back-off, and the
run goes on; files end when they end."""

import contextlib
import os
import re
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import cv2
import numpy as np

from edgeinspect.runtime.console import InspectError, RateLimitedWarning, warn
from edgeinspect.runtime.datasets import BUILTIN_DATASETS, open_dataset
from edgeinspect.runtime.inference.images import IMAGE_SUFFIXES, list_images, read_image, to_rgb

BACKOFF_START_S, BACKOFF_MAX_S = 0.5, 10.0


class FrameSource:
    """Iterable of (name, RGB frame or None, why not): a frame that cannot be decoded comes with its reason
    instead, so the run logs it and goes on. `live` says whether frames keep coming whatever we do (a camera)."""

    live = False

    def __init__(self, description: str):
        self.description = description
        self.reconnects = 0

    def frames(self, stop) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
        raise NotImplementedError


class FolderSource(FrameSource):
    """The images of a folder in name order; with `watch`, new files as they arrive, and new content under a name
    already taken (a file renamed over another, or rewritten in place) once more. A file is taken once its
    modification time is `settle_s` old (a writer still busy with it would give half an image), and one that
    does not decode is tried again at every poll until it has not changed for `give_up_s`, then logged as
    skipped. A watched folder that disappears is waited for, with a warning once a minute."""

    def __init__(self, paths: list[Path], folder: Path | None = None, watch: bool = False, poll_s: float = 0.5,
                 settle_s: float = 0.25, give_up_s: float = 5.0):
        super().__init__(str(folder) if folder else "image list")
        self.paths, self.folder, self.watch, self.poll_s = paths, folder, watch, poll_s
        self.settle_s, self.give_up_s = settle_s, give_up_s
        self.warn = RateLimitedWarning()

    def frames(self, stop) -> Iterator[tuple[str, np.ndarray | None, str | None]]:
        if not self.watch:
            for path in self.paths:
                if stop.is_set():
                    return
                yield self._read(path, give_up=True)
            return
        taken: dict[str, tuple] = {}  # name → (inode, mtime, size) of the content taken or given up on
        while not stop.is_set():
            for name, signature, modified in self._listing():
                if taken.get(name) == signature or time.time() - modified < self.settle_s:
                    continue  # seen already, or still being written: next poll
                name, rgb, error = self._read(self.folder / name, give_up=time.time() - modified >= self.give_up_s)
                if rgb is None and error is None:
                    continue  # undecodable but recent: try again at the next poll
                taken[name] = signature
                yield name, rgb, error
                if stop.is_set():
                    return
            stop.wait(self.poll_s)

    def _listing(self) -> list[tuple[str, tuple, float]]:
        """(name, identity of its content, modification time) of the folder's images, in name order."""
        try:
            with os.scandir(self.folder) as entries:
                files = [(entry.name, entry.stat()) for entry in entries
                         if entry.name.lower().endswith(tuple(IMAGE_SUFFIXES)) and not entry.name.startswith(".")
                         and entry.is_file()]
        except FileNotFoundError:
            self.warn("folder", f"--source {self.folder}: the watched folder is gone; waiting for it to come back")
            return []
        except OSError as error:
            self.warn("folder", f"--source {self.folder}: cannot list it ({error.strerror or error}); trying again")
            return []
        return [(name, (stat.st_ino, stat.st_mtime_ns, stat.st_size), stat.st_mtime) for name, stat in sorted(files)]

    @staticmethod
    def _read(path: Path, give_up: bool) -> tuple[str, np.ndarray | None, str | None]:
        try:
            return path.name, read_image(path), None
        except InspectError as error:
            return path.name, None, (str(error) if give_up else None)


@contextlib.contextmanager
def opencv_quiet():
    """OpenCV's own log lines held back while a capture opens: a camera that is not there makes each of its
    backends print warnings and exceptions before our one-line error says the same. $OPENCV_LOG_LEVEL, when set,
    is left to decide."""
    if "OPENCV_LOG_LEVEL" in os.environ:
        yield
        return
    previous = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(previous)


class CaptureSource(FrameSource):
    """OpenCV VideoCapture on a file, URL, camera index or GStreamer pipeline."""

    def __init__(self, target, option: str, live: bool, api: int = cv2.CAP_ANY, loop: bool = False):
        super().__init__(option)
        self.target, self.option, self.live, self.api, self.loop = target, option, live, api, loop
        self.capture = self._open()
        if self.capture is None:
            raise InspectError(f"{option}: could not be opened (not connected, busy, or not a video OpenCV can read)")

    def _open(self):
        with opencv_quiet():
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
                    try:
                        rgb, error = to_rgb(frame), None
                    except InspectError as problem:
                        rgb, error = None, str(problem)
                    yield str(index), rgb, error
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


def with_credentials(url: str, username: str | None, password: str | None) -> str:
    """A stream URL with its source's user name and password put into it (OpenCV takes them only there),
    percent-encoded."""
    if username is None:
        return url
    parts = urlsplit(url)
    user = quote(username, safe="") + (f":{quote(password, safe='')}" if password is not None else "")
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))


def without_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without user name and password, the user name, the password), the last two decoded."""
    parts = urlsplit(url)
    if "://" not in url or "@" not in parts.netloc:
        return url, None, None
    user, _, host = parts.netloc.rpartition("@")
    name, has_password, password = user.partition(":")
    return urlunsplit(parts._replace(netloc=host)), unquote(name), unquote(password) if has_password else None


def shown_url(text: str) -> str:
    """A source as it may be shown, logged, published or put in a file name: a URL's password as ***."""
    url, username, password = without_credentials(text)
    if username is None:
        return text
    parts = urlsplit(url)
    user = quote(username, safe="") + (":***" if password is not None else "")
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc}"))


SOURCE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def named_source(text: str) -> tuple[str | None, str]:
    """--source NAME=SOURCE → (NAME, SOURCE); a source without a name → (None, text). A name is letters, digits,
    '_', '.' and '-' (so a GStreamer pipeline's `device=…` or a URL's `?a=b` is not one), and an existing file or
    folder of that whole text is never split."""
    name, equals, rest = text.partition("=")
    if equals and rest and SOURCE_NAME.fullmatch(name) and not Path(text).exists():
        return name, rest
    return None, text


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
    if "://" in source:  # named without its password in every message
        return CaptureSource(source, f"--source {shown_url(source)}", live=True)
    if path.is_file():
        return CaptureSource(source, f"--source {source}", live=False, loop=loop)
    raise InspectError(f"--source {source}: no such file, folder or camera")
