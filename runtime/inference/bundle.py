"""The bundle: one folder with the exported model files and ``bundle.json``, the one metadata record the
runtime configures itself from (input size, outputs, preprocessing, thresholds, file digests).

bundle.json is checked once, where it is read (load_bundle), against one JSON Schema (BUNDLE_SCHEMA), and again
before it is written (Bundle.save): everything past load_bundle may take the fields it reads as valid."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

from edgeinspect.runtime.console import InspectError, warn
from edgeinspect.runtime.files import atomic_write_bytes, sha256_file
from edgeinspect.runtime.inference.signing import check_trusted, still_signed
from edgeinspect.runtime.schema import check_finite, check_record, strict_validator

BUNDLE_FORMAT_VERSION = 1
BUNDLE_RECORD = "bundle.json"
MAX_INPUT_SIDE = 4096  # pixels per side of the model input: what inspect-train accepts
OUTPUT_NAMES = ["anomaly_map", "score"]
MODEL_FIELDS = ("model_file", "fp16_model_file", "int8_model_file")  # the ONNX models a bundle may hold

# "x-message" (an annotation, ignored by the validator) says in words what a field must be; the error for a
# field names the field and quotes that text, e.g. "input.size must be [height, width] of whole numbers ≥ 1".
_FILE_NAME = {"type": "string", "pattern": r"^(?!\.\.?$)[^/\\]+$",
              "x-message": "a file name inside the bundle folder (no folders)"}
_LEVEL_THRESHOLD = {
    "type": "object", "required": ["threshold"],
    "properties": {"threshold": {"type": "number", "x-message": "a finite number"}},
    "x-message": 'an object with a finite numeric "threshold"',
}
_BATCH_SIZES = {"type": "array", "minItems": 3, "maxItems": 3, "items": {"type": "integer", "minimum": 1},
                "x-message": "[min, opt, max] batch sizes, whole numbers ≥ 1"}
BUNDLE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "x-message": "a JSON object",
    "required": ["format_version", "model", "model_file", "input", "outputs", "files"],
    "properties": {
        "format_version": {"type": "integer", "minimum": 1, "x-message": "a whole number ≥ 1"},
        "model": {"type": "string", "minLength": 1, "x-message": "the model kind's name"},
        "model_file": _FILE_NAME,
        "input": {
            "type": "object", "required": ["name", "size"],
            "x-message": "an object with the graph input's name and size",
            "properties": {
                "name": {"type": "string", "minLength": 1, "x-message": "the graph input's name"},
                "size": {"type": "array", "minItems": 2, "maxItems": 2,
                         "items": {"type": "integer", "minimum": 1, "maximum": MAX_INPUT_SIDE},
                         "x-message": f"[height, width] of whole numbers ≥ 1 (at most {MAX_INPUT_SIDE})"},
            },
        },
        "outputs": {"const": OUTPUT_NAMES,
                    "x-message": f"{json.dumps(OUTPUT_NAMES)} (the output names of the exported graph)"},
        "files": {
            "type": "object", "minProperties": 1,
            "x-message": "an object of the model files' sha256 and size",
            "propertyNames": {"pattern": r"^(?!\.\.?$)[^/\\]+$", "x-message": "a file name inside the bundle folder"},
            "additionalProperties": {
                "type": "object", "required": ["sha256", "bytes"],
                "x-message": 'an object with "sha256" (64 hex digits) and "bytes"',
                "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$",
                                          "x-message": "64 lower-case hex digits"},
                               "bytes": {"type": "integer", "minimum": 0, "x-message": "a whole number ≥ 0"}},
            },
        },
        "training": {
            "type": "object", "x-message": "an object",
            "properties": {"validation": {"type": "array", "items": {"type": "string"},
                                          "x-message": "a list of image paths"}},
        },
        "thresholds": {
            "type": ["object", "null"], "required": ["image", "pixel"],
            "x-message": "null (not calibrated) or an object with image and pixel thresholds (see inspect-calibrate)",
            "properties": {"image": _LEVEL_THRESHOLD, "pixel": _LEVEL_THRESHOLD},
        },
        "fp16_model_file": {"anyOf": [{"type": "null"}, _FILE_NAME],
                            "x-message": "null or a file name inside the bundle folder"},
        "int8_model_file": {"anyOf": [{"type": "null"}, _FILE_NAME],
                            "x-message": "null or a file name inside the bundle folder"},
        "engine": {
            "type": ["object", "null"], "required": ["file", "batch_sizes"],
            "x-message": "null or an object with the engine's file and batch_sizes",
            "properties": {"file": _FILE_NAME, "batch_sizes": _BATCH_SIZES},
        },
        "batch_profile": _BATCH_SIZES,
        "tensorrt_check": {
            "type": ["object", "null"], "x-message": "null or the TensorRT check's record",
            "properties": {"ok": {"type": "boolean", "x-message": "true or false"},
                           "max_batch": {"type": "integer", "minimum": 1, "x-message": "a whole number ≥ 1"},
                           "problems": {"type": "array", "items": {"type": "string"}, "x-message": "a list of strings"}},
        },
        "precision": {
            "type": "object", "x-message": "an object",
            "properties": {"fp32_nodes": {"type": "array", "items": {"type": "string"},
                                          "x-message": "a list of node names"}},
        },
    },
}
_VALIDATOR = strict_validator(BUNDLE_SCHEMA)


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
        """Write bundle.json atomically; a record that load_bundle would refuse is never written. A signature that
        no longer matches what it covered (thresholds recalibrated, a model added) is removed, with a warning."""
        path = self.path / BUNDLE_RECORD
        if self.record.get("signature") and not still_signed(self.record):
            del self.record["signature"]
            warn(f"{path}: changed after it was signed, so its signature is removed; sign it again "
                 "(inspect-calibrate BUNDLE --sign KEY) where --trust is used")
        check_finite(self.record, path)
        text = json.dumps(self.record, indent=2, allow_nan=False) + "\n"
        validate_record(json.loads(text), path)  # as load_bundle will read it (tuples as lists, numpy as numbers)
        atomic_write_bytes(path, text.encode())


def file_digests(folder: Path, names: list[str]) -> dict:
    return {name: {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size} for name in names}


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of the range of a number")
    return value


def parse_record(text: str, record_path: Path) -> dict:
    """bundle.json's text → its record; NaN, Infinity and numbers out of range are refused."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except ValueError as error:  # JSONDecodeError, and the refusals above
        raise InspectError(f"{record_path}: not valid JSON ({error})") from None


def validate_record(record, record_path: Path) -> None:
    """One-line InspectError naming bundle.json, the field and what it must be, for the first problem found."""
    check_record(record, BUNDLE_SCHEMA, _VALIDATOR, record_path)
    _check_files_listed(record, record_path)


def _check_files_listed(record: dict, record_path: Path) -> None:
    """The ONNX models the record names are listed in "files", so that load_bundle verifies them."""
    for field in MODEL_FIELDS:
        name = record.get(field)
        if name and name not in record["files"]:
            raise InspectError(f"{record_path}: {field} {name!r} is not listed in files (its sha256 and size); "
                               "re-export the bundle")


def load_bundle(path: Path, verify: bool = True, trust: list[Path] | None = None) -> Bundle:
    """Read bundle.json, validate it against BUNDLE_SCHEMA and check every model file against its sha256; with
    `trust` (public key files), its signature too. Any problem is a one-line error naming bundle.json and the
    field, or the file."""
    path = Path(path)
    record_path = path / BUNDLE_RECORD
    if not record_path.is_file():
        raise InspectError(f"{path}: not a bundle (no {BUNDLE_RECORD}; see inspect-export)")
    try:
        text = record_path.read_text(encoding="utf-8")
    except (OSError, ValueError) as error:
        raise InspectError(f"{record_path}: unreadable ({error})") from None
    record = parse_record(text, record_path)
    version = record.get("format_version") if isinstance(record, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > BUNDLE_FORMAT_VERSION:
        raise InspectError(f"{record_path}: bundle format {version} is newer than this runtime reads "
                           f"({BUNDLE_FORMAT_VERSION}); update edge-inspect on this machine")
    validate_record(record, record_path)
    if verify:
        for name, expected in record["files"].items():
            file = path / name
            if not file.is_file():
                raise InspectError(f"{file}: missing from the bundle; copy the whole bundle folder again")
            if sha256_file(file) != expected["sha256"]:
                raise InspectError(f"{file}: sha256 does not match bundle.json (corrupt or modified); "
                                   "copy the bundle again or re-export it")
        for name in filter(None, (record.get(field) for field in MODEL_FIELDS)):
            check_graph(path / name, record["input"]["name"], tuple(record["input"]["size"]))
    if trust:
        check_trusted(record, record_path, trust)  # after the digests: the signature covers the files through them
    return Bundle(path, record)


def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else "batch" for d in value.type.tensor_type.shape.dim]


def check_graph(path: Path, input_name: str, size: tuple[int, int]) -> None:
    """The model's own input and outputs are what bundle.json and every backend expect: uint8 images (B, H, W, 3)
    of the recorded size in, anomaly_map (B, 1, H, W) and score (B,) out. A bundle.json edited to another size, or
    a model swapped with its digest for another graph, is a one-line error here, not a backend's traceback later."""
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as error:  # a damaged or foreign file: protobuf raises several kinds
        raise InspectError(f"{path}: not an ONNX model ({type(error).__name__}); re-export the bundle") from None
    constants = {initializer.name for initializer in graph.initializer}
    inputs = [value for value in graph.input if value.name not in constants]
    height, width = size
    wanted_input = [input_name, ["batch", height, width, 3]]
    found = [[value.name, _dims(value)] for value in inputs]
    if found != [wanted_input] or inputs[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise InspectError(f"{path}: the graph takes {found} but bundle.json says {wanted_input} (uint8): bundle.json "
                           "or the model was changed; re-export the bundle")
    outputs = [[value.name, _dims(value)] for value in graph.output]
    wanted = [[OUTPUT_NAMES[0], ["batch", 1, height, width]], [OUTPUT_NAMES[1], ["batch"]]]
    if outputs != wanted:
        raise InspectError(f"{path}: the graph gives {outputs}, not {wanted}: not a model of this bundle; "
                           "re-export the bundle")
