"""--collect-good DIR --collect N: good frames saved as they come from the camera path, to calibrate on.

Scores depend on the whole path from the part to the model (lens, light, sensor, compression, the stream's
codec): a threshold set on PNGs from elsewhere can put every good part above it. This sink saves N frames
exactly as inspect-run receives them (RGB as decoded, before the resize to the model's input; PNG, lossless)
while the line makes good parts, then stops saving and says the command that recalibrates on them."""

import math
import time
from pathlib import Path

import cv2
from edgeinspect.runtime.console import InspectError, console
from edgeinspect.runtime.files import atomic_write_bytes, writable_dir
from edgeinspect.runtime.outputs.out_folder import source_file_part
from edgeinspect.runtime.outputs.sinks import Inspected, Sink


class CollectSink(Sink):
    """Saves the first `count` readable frames, at least `every_s` apart (1 s keeps a camera at 30 frames/s
    from giving N near copies of one part), as DIR/RUN-SOURCE-FRAME.png; written whole (temporary file and
    rename), so inspect-calibrate never reads half an image."""

    def __init__(self, folder: Path, count: int, every_s: float, run_id: str, bundle_dir: Path):
        if count < 1:
            raise InspectError(f"--collect must be at least 1, got {count}")
        if not (every_s >= 0 and math.isfinite(every_s)):
            raise InspectError(f"--collect-every must be 0 or a positive number of seconds, got {every_s}")
        self.folder = writable_dir(folder, "--collect-good")
        self.count, self.every_s, self.run_id, self.bundle_dir = count, every_s, run_id, bundle_dir
        self.saved = 0
        self.last = -math.inf

    def handle(self, item: Inspected) -> None:
        if self.saved >= self.count or item.skipped or item.rgb is None:
            return
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        record = item.record
        source = source_file_part(str(record.get("source", "")))
        ok, png = cv2.imencode(".png", cv2.cvtColor(item.rgb, cv2.COLOR_RGB2BGR))
        if not ok:
            raise OSError(f"frame {record.get('frame')} could not be encoded as PNG")
        atomic_write_bytes(self.folder / f"{self.run_id}-{source}-{record.get('frame', 0):06d}.png", png.tobytes())
        self.last = now
        self.saved += 1
        if self.saved == self.count:
            console.print(f"collected {self.count} frames in {self.folder}; if they show good parts, recalibrate "
                          f"on them: inspect-calibrate {self.bundle_dir} --images {self.folder}")

    def close(self) -> None:
        if 0 < self.saved < self.count:
            console.print(f"collected {self.saved} of {self.count} frames in {self.folder} (the run ended first); "
                          f"inspect-calibrate {self.bundle_dir} --images {self.folder} uses them")
        elif self.saved == 0:
            console.print(f"--collect-good {self.folder}: no frame saved (none could be read)")
