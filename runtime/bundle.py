"""The bundle: one folder with the exported model files and ``bundle.json``, the one metadata record the
runtime configures itself from (input size, outputs, preprocessing, thresholds, file digests)."""

import json
from dataclasses import dataclass
from pathlib import Path

from .console import InspectError
from .files import atomic_write_json, sha256_file

BUNDLE_FORMAT_VERSION = 1
BUNDLE_RECORD = "bundle.json"


@dataclass
class Bundle:
    path: Path
    record: dict

    @property
    def input_size(self) -> tuple[int, int]:
        return tuple(self.record["input"]["size"])

    @property
    def model_file(self) -> Path:
        return self.path / self.record["model_file"]

    @property
    def thresholds(self) -> dict | None:
        return self.record.get("thresholds")

    def save(self) -> None:
        atomic_write_json(self.path / BUNDLE_RECORD, self.record)


def file_digests(folder: Path, names: list[str]) -> dict:
    return {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in names}


def load_bundle(path: Path, verify: bool = True) -> Bundle:
    """Read bundle.json and check every model file against its sha256; any mismatch is a one-line error."""
    path = Path(path)
    record_path = path / BUNDLE_RECORD
    if not record_path.is_file():
        raise InspectError(f"{path}: not a bundle (no {BUNDLE_RECORD}; see inspect-export)")
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as error:
        raise InspectError(f"{record_path}: unreadable ({error})") from None
    version = record.get("format_version")
    if not isinstance(version, int):
        raise InspectError(f"{record_path}: no format_version")
    if version > BUNDLE_FORMAT_VERSION:
        raise InspectError(f"{record_path}: bundle format {version} is newer than this runtime reads "
                           f"({BUNDLE_FORMAT_VERSION}); update edge-inspect on this machine")
    if verify:
        for name, expected in record.get("files", {}).items():
            file = path / name
            if not file.is_file():
                raise InspectError(f"{file}: missing from the bundle; copy the whole bundle folder again")
            if sha256_file(file) != expected["sha256"]:
                raise InspectError(f"{file}: sha256 does not match bundle.json (corrupt or modified); "
                                   "copy the bundle again or re-export it")
    return Bundle(path, record)
