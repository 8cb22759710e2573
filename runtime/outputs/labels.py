"""What the operator says on the page about NG frames, and the teaching it starts.

A labelled frame is kept as the model received it (PNG, lossless, before the resize) under OUT/labels/good (false
alarms: good parts to teach) or OUT/labels/defect (confirmed defects, which teaching must keep catching), image
folders that `inspect-teach --good/--defects` takes as they are; its record, with the label, in
OUT/labels/records/. Labelling a frame again moves it. Teaching runs in a thread of its own, one at a time, while
the line goes on; the new version it writes is taken in by the hot swap."""

import json
import threading
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.files import atomic_write_bytes, atomic_write_json

LABELS = ("good", "defect")


class LabelStore:
    def __init__(self, out: Path):
        self.root = Path(out) / "labels"
        self.lock = threading.Lock()
        self.counts = {label: len(list((self.root / label).glob("*.png"))) for label in LABELS}

    def folder(self, label: str) -> Path:
        return self.root / label

    def save(self, record: dict, rgb: np.ndarray, label: str) -> Path:
        """The frame and its record under `label` (and no longer under the other one)."""
        name = record["id"]
        path = self.folder(label) / f"{name}.png"
        with self.lock:
            atomic_write_bytes(path, cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())
            atomic_write_json(self.root / "records" / f"{name}.json", {**record, "label": label})
            for other in LABELS:
                if other != label:
                    (self.folder(other) / f"{name}.png").unlink(missing_ok=True)
            self.counts = {each: len(list(self.folder(each).glob("*.png"))) for each in LABELS}
        return path


class TeachJob:
    """`teach(good_dir, defect_dir or None)` in a thread, returning the new version's number; `state` says how
    it went, for the page."""

    def __init__(self, teach: Callable[[Path, Path | None], int], labels: LabelStore):
        self.teach, self.labels = teach, labels
        self.lock = threading.Lock()
        self.state = {"state": "idle", "message": ""}
        self.thread: threading.Thread | None = None

    def start(self) -> tuple[bool, dict]:
        with self.lock:
            if self.state["state"] == "running":
                return False, dict(self.state)
            if not self.labels.counts["good"]:
                return False, {"state": "idle", "message": "no frame is marked as a good part yet"}
            self.state = {"state": "running", "message": f"teaching {self.labels.counts['good']} good frames"}
            self.thread = threading.Thread(target=self._run, name="teach", daemon=True)
            self.thread.start()
            return True, dict(self.state)

    def _run(self) -> None:
        defects = self.labels.folder("defect") if self.labels.counts["defect"] else None
        try:
            number = self.teach(self.labels.folder("good"), defects)
            state = {"state": "done", "message": f"version {number} written; the line takes it in"}
        except InspectError as refusal:
            state = {"state": "refused", "message": str(refusal)}
        except Exception as error:  # noqa: BLE001 - said on the page; the line goes on
            state = {"state": "failed", "message": f"{type(error).__name__}: {error}"}
        with self.lock:
            self.state = state


def json_body(raw: bytes) -> dict | None:
    """A small JSON object, or None."""
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return body if isinstance(body, dict) else None
