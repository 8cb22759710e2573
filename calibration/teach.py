"""Teaching a PatchCore bundle the good parts it flags (`inspect-teach BUNDLE --good DIR`), on the box and without
torch or retraining.

The patch features come from the bundle's own graph, cut at the projection's output for the occasion
(`onnx.utils.extract_model`) and run through OpenVINO: nothing more is stored in the bundle or computed per frame.
A taught patch is new when it lies farther from the memory bank than the held-out good images' patches do
(their COVERAGE_QUANTILE distance); the new entries are chosen as the coreset chooses, farthest first, at most
MAX_NEW_SHARE of the bank per teaching and MAX_GROWTH times the trained bank in all, so the bank and its search
stay bounded. The bank's two constants (the bank, whose norms the graph computes, and −2·bankᵀ, which every
block's Gemm reads) are rewritten with the `onnx` package in model.onnx and the fp16 model; the TensorRT engine
is built again where TensorRT is present, and the INT8 model (and an INT8 engine) is dropped, with the command
that remakes it. Thresholds are recalibrated, by the parent's rule, on the held-out good images plus every
CALIBRATION_EVERY-th taught image (which the bank does not take), and never lowered: teaching widens what is
good.

Each teaching is a new version (`version` in bundle.json: number, the parent's model digest, what was added, when,
by whom); the parent is kept in BUNDLE.versions/ and `inspect-teach BUNDLE --rollback` brings it back. With
--defects, teaching is refused when a defect the parent caught would pass."""

import fcntl
import getpass
import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgeinspect.export import device_export
from edgeinspect.runtime.console import InspectError, console
from edgeinspect.runtime.files import staged_dir
from edgeinspect.runtime.inference.backends import openvino_config
from edgeinspect.runtime.inference.bundle import Bundle, file_digests, load_bundle
from edgeinspect.runtime.inference.images import load_resized
from edgeinspect.runtime.inference.inspector import Inspector

from .thresholds import METHODS, calibrate

BANK = "memory.bank"  # the bank's initializer: the name PatchCore's export gives its buffer
MAX_NEW_SHARE = 0.25  # entries added per teaching, as a share of the bank (BENCHMARKS.md: how it was chosen)
MAX_GROWTH = 2.0  # the bank stays within twice its trained size; beyond, retraining is the answer
COVERAGE_QUANTILE = 0.99  # of the held-out good patches' distances to the bank: what the bank already covers
CALIBRATION_EVERY = 4  # every 4th taught image calibrates instead of teaching


@dataclass
class BankInGraph:
    """Where PatchCore's graph keeps its memory bank."""

    queries: str  # the projected patch features (B, P, C) the search reads
    bank: onnx.TensorProto  # the bank (entries, C)
    search_weight: onnx.TensorProto  # −2·bankᵀ (C, entries), which every block's Gemm shares


def find_bank(model: onnx.ModelProto, where: Path) -> BankInGraph:
    initializers = {init.name: init for init in model.graph.initializer}
    gemms = [node for node in model.graph.node if node.op_type == "Gemm" and node.input[1] in initializers]
    if BANK not in initializers or not gemms or len({node.input[1] for node in gemms}) != 1:
        raise InspectError(f"{where}: no memory bank found in the graph (a PatchCore bundle has {BANK!r} and one "
                           "search constant); re-export it from its run")
    bank, weight = initializers[BANK], initializers[gemms[0].input[1]]
    if not np.allclose(numpy_helper.to_array(weight), -2 * numpy_helper.to_array(bank).T, rtol=1e-5, atol=1e-5):
        raise InspectError(f"{where}: the search constant is not −2·bankᵀ; re-export the bundle from its run")
    made_by = {output: node for node in model.graph.node for output in node.output}
    queries = gemms[0].input[0]
    while queries in made_by and made_by[queries].op_type in ("Reshape", "Slice"):  # back through the blocking
        queries = made_by[queries].input[0]
    return BankInGraph(queries, bank, weight)


def patch_features(bundle: Bundle, queries: str, images: np.ndarray, threads: int | None = None) -> np.ndarray:
    """(N, P, C) projected patch features of uint8 images (N, H, W, 3), from the bundle's graph cut at `queries`."""
    import openvino

    with tempfile.TemporaryDirectory() as scratch:
        cut = Path(scratch) / "features.onnx"
        onnx.utils.extract_model(str(bundle.model_file), str(cut), [bundle.record["input"]["name"]], [queries])
        core = openvino.Core()
        model = core.read_model(cut)
        model.reshape({model.inputs[0].get_any_name(): [1, *images.shape[1:]]})
        compiled = core.compile_model(model, "CPU", openvino_config(threads))
    request = compiled.create_infer_request()
    return np.stack([request.infer({0: image[None]})[compiled.outputs[0]][0] for image in images])


def nearest_distances(points: np.ndarray, centres: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Distance of each point (N, C) to its nearest centre (M, C), in blocks of `chunk` points."""
    centre_norms = (centres**2).sum(1)
    nearest = []
    for start in range(0, len(points), chunk):
        block = points[start:start + chunk]
        squared = (block**2).sum(1)[:, None] - 2 * block @ centres.T + centre_norms
        nearest.append(np.sqrt(np.clip(squared.min(1), 0, None)))
    return np.concatenate(nearest)


def choose_entries(candidates: np.ndarray, bank: np.ndarray, radius: float, limit: int) -> np.ndarray:
    """Farthest first, as the coreset chooses, while the farthest candidate lies beyond `radius` from the bank and
    the entries already chosen, up to `limit` entries."""
    distance = nearest_distances(candidates, bank)
    chosen = []
    while len(chosen) < limit:
        index = int(np.argmax(distance))
        if distance[index] <= radius:
            break
        chosen.append(index)
        distance = np.minimum(distance, np.linalg.norm(candidates - candidates[index], axis=1))
    return candidates[chosen]


def rewrite_bank(path: Path, new_bank: np.ndarray) -> None:
    """The bank and −2·bankᵀ replaced in the ONNX file at `path` (the fp16 model keeps them fp32, like model.onnx)."""
    model = onnx.load(str(path))
    found = find_bank(model, path)
    for tensor, value in ((found.bank, new_bank), (found.search_weight, -2 * new_bank.T)):
        tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), tensor.name))
    onnx.save(model, str(path))


def rebuild_engine(staged: Bundle, engine: dict | None) -> bool:
    """The fp32 or fp16 TensorRT engine built again from the rewritten model, where TensorRT is here (the INT8
    one needs the INT8 model quantized again: inspect-export BUNDLE --int8 --engine)."""
    if not engine or engine.get("precision") == "int8":
        return False
    if device_export.tensorrt_unavailable() is not None:
        return False
    device_export.add_engine(staged, device_export.EngineOptions(fp16=engine.get("precision") == "fp16",
                                                                 build_engine=True))
    return True


def versions_dir(bundle_dir: Path) -> Path:
    """Where earlier versions are kept: beside the bundle, so that copying the bundle copies one version."""
    return bundle_dir.parent / f"{bundle_dir.name}.versions"


def version_number(record: dict) -> int:
    return (record.get("version") or {}).get("number", 1)


def version_name(record: dict) -> str:
    """A kept version's folder: its number and its model's digest (a re-exported bundle starts again at 1)."""
    return f"v{version_number(record)}-{record['files'][record['model_file']]['sha256'][:12]}"


@contextmanager
def teaching_lock(bundle_dir: Path):
    """One teaching or rollback of a bundle at a time (the page's and a shell's could overlap)."""
    lock_path = bundle_dir.parent / f".{bundle_dir.name}.teaching.lock"
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InspectError(f"{bundle_dir}: another teaching or rollback of it is running") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def scores_of(bundle: Bundle, images: list[Path]) -> dict[Path, float]:
    """Image score of each readable image (the unreadable ones are named in a warning)."""
    return {path: float(score) for path, _, _, score in Inspector(bundle).infer_files(images)}


def teach(bundle_dir: Path, good: list[Path], defects: list[Path], by: str | None = None,
          trust: list[Path] | None = None) -> Bundle:
    """A new version of the bundle that has learnt `good`; the parent kept in BUNDLE.versions/."""
    with teaching_lock(Path(bundle_dir)):
        return _teach(bundle_dir, good, defects, by, trust)


def _teach(bundle_dir: Path, good: list[Path], defects: list[Path], by: str | None,
           trust: list[Path] | None) -> Bundle:
    bundle = load_bundle(bundle_dir, trust=trust)
    record = bundle.record
    if record["model"] != "patchcore":
        raise InspectError(f"{bundle.path}: a {record['model']} bundle has no memory bank to add to; teaching it is a "
                           f"short fine-tune on the workstation (inspect-train {record['model']} with these images among "
                           "its good training images, then inspect-export and copy the bundle)")
    if record["config"].get("image_score", "map-max") != "map-max":
        raise InspectError(f"{bundle.path}: the reweighted image score reads each entry's neighbours, which teaching "
                           "does not recompute; teach bundles trained with the default image score (map-max)")
    if not bundle.thresholds:
        raise InspectError(f"{bundle.path}: not calibrated; run inspect-calibrate {bundle.path} first")
    validation = [Path(p) for p in (record.get("training") or {}).get("validation", [])]
    missing = [p for p in validation if not p.is_file()]
    if not validation or missing:
        raise InspectError(f"{missing[0] if missing else bundle.path}: the held-out good images are needed to measure "
                           "what the bank covers and to recalibrate, and are not here")
    calibration_extra = good[CALIBRATION_EVERY - 1::CALIBRATION_EVERY]
    taught = [path for path in good if path not in calibration_extra]
    model = onnx.load(str(bundle.model_file))
    where = find_bank(model, bundle.model_file)
    bank = numpy_helper.to_array(where.bank)
    held_out = patch_features(bundle, where.queries, load_resized(validation, bundle.input_size)[0])
    radius = float(np.quantile(nearest_distances(held_out.reshape(-1, bank.shape[1]), bank), COVERAGE_QUANTILE))
    candidates = patch_features(bundle, where.queries, load_resized(taught, bundle.input_size)[0])
    trained = (record.get("version") or {}).get("taught", {}).get("trained_entries", len(bank))
    limit = min(math.ceil(MAX_NEW_SHARE * len(bank)), math.floor(MAX_GROWTH * trained) - len(bank))
    if limit <= 0:
        raise InspectError(f"{bundle.path}: the memory bank has grown to {len(bank)} entries from {trained} trained, "
                           f"the most teaching adds ({MAX_GROWTH:g}×, each entry costs search time per frame); retrain "
                           "on the workstation with the taught frames among the good training images")
    added = choose_entries(candidates.reshape(-1, bank.shape[1]), bank, radius, limit)
    if not len(added):
        raise InspectError(f"every patch of the {len(taught)} taught images lies within what the bank covers "
                           f"(distance ≤ {radius:.3g}): nothing to teach; if they are flagged, recalibrate instead")
    new_bank = np.concatenate([bank, added])
    console.print(f"{len(added)} new bank entries from {len(taught)} images ({len(candidates.reshape(-1, bank.shape[1]))} "
                  f"patches; beyond {radius:.3g}, the held-out good patches' {COVERAGE_QUANTILE:g} quantile"
                  f"{'; the limit per teaching' if len(added) == limit else ''}): {len(bank)} → {len(new_bank)}")

    with staged_dir(bundle.path, copy_of=bundle.path) as staging:
        staged = Bundle(staging, dict(record))
        for field in ("model_file", "fp16_model_file"):
            if record.get(field):
                rewrite_bank(staging / record[field], new_bank)
        dropped = [name for name in (record.get("int8_model_file"), (record.get("engine") or {}).get("file")) if name]
        for name in dropped:
            (staging / name).unlink(missing_ok=True)
        if dropped:
            staged.record.update(int8_model_file=None, engine=None)
            staged.record.pop("int8", None)
            if rebuild_engine(staged, record.get("engine")):
                dropped.remove(record["engine"]["file"])
        staged.record["files"] = file_digests(staging, device_export.model_files(staged.record))
        parent = bundle.thresholds
        method = next(key for key, name in METHODS.items() if name == parent["method"])
        source = f"{parent['source']} + {len(calibration_extra)} taught"
        precision = parent.get("precision", "fp32") if staged.record.get("int8_model_file") else "fp32"
        recalibrated = calibrate(staged, validation + calibration_extra, parent["image"].get("k", 3.0), source,
                                 method, parent["image"].get("fpr", 0.01), precision)
        if recalibrated["image"]["threshold"] < parent["image"]["threshold"] and precision == parent.get("precision",
                                                                                                         "fp32"):
            # teaching widens what is good; a threshold that came out lower is the noise of a few images, and
            # would flag parts the parent passed
            staged.record["thresholds"] = {**parent, "source": f"{parent['source']} (kept: recalibrated on "
                                           f"{source} it came out lower, {recalibrated['image']['threshold']:.4g})"}
            staged.save()
        if defects:  # the regression guard
            before, after = scores_of(bundle, defects), scores_of(staged, defects)
            now, then = bundle.thresholds["image"]["threshold"], staged.thresholds["image"]["threshold"]
            lost = [path for path in before if before[path] > now and not after[path] > then]
            if lost:
                raise InspectError(f"teaching refused: {len(lost)} of {len(before)} confirmed defects the current "
                                   f"version catches would pass, e.g. {lost[0]} (score {before[lost[0]]:.4g} > "
                                   f"{now:.4g} now, {after[lost[0]]:.4g} ≤ {then:.4g} taught); nothing changed")
        staged.record["version"] = {
            "number": version_number(record) + 1, "parent": record["files"][record["model_file"]]["sha256"],
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "by": by or getpass.getuser(),
            "taught": {"images": len(taught), "calibration_images": len(calibration_extra), "entries_added": len(added),
                       "bank_entries": len(new_bank), "trained_entries": trained, "coverage_radius": round(radius, 6),
                       "defects_checked": len(defects)}}
        staged.save()
        kept = versions_dir(bundle.path) / version_name(record)
        shutil.rmtree(kept, ignore_errors=True)  # this very version, kept before and rolled back to since
        shutil.copytree(bundle.path, kept)
    if dropped:
        console.print(f"dropped {', '.join(dropped)} (made from the old bank): inspect-export {bundle.path} "
                      f"{'--int8 ' if record.get('int8_model_file') else ''}{'--engine' if record.get('engine') else ''}"
                      " remakes them")
    return load_bundle(bundle.path)


def rollback(bundle_dir: Path) -> Bundle:
    """The parent of the version in place back (the kept version whose model digest the current one names as its
    parent); the version it replaces is kept too, as …-rolled-back."""
    with teaching_lock(Path(bundle_dir)):
        bundle = load_bundle(bundle_dir, verify=False)
        history = versions_dir(bundle.path)
        parent_digest = (bundle.record.get("version") or {}).get("parent")
        kept = [p for p in history.glob("v*") if not p.name.endswith("-rolled-back")] if history.is_dir() else []
        matching = [p for p in kept if p.name.endswith(f"-{(parent_digest or '')[:12]}")] if parent_digest else []
        if not matching:
            raise InspectError(f"{bundle.path}: version {version_number(bundle.record)} has no parent kept in "
                               f"{history}" + ("" if parent_digest else " (it was not taught: nothing to roll back)"))
        parent = load_bundle(matching[0])  # verified before anything moves
        with staged_dir(bundle.path, copy_of=parent.path):
            rolled_back = history / f"{version_name(bundle.record)}-rolled-back"
            shutil.rmtree(rolled_back, ignore_errors=True)
            shutil.copytree(bundle.path, rolled_back)
        shutil.rmtree(parent.path)
    return load_bundle(bundle.path)
