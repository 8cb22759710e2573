"""Where good and test images come from: an MVTec-AD-layout folder, a plain folder of good images, or a
built-in name (``elpv``: the solar-cell images of the PyPI package ``elpv-dataset``)."""

import random
from dataclasses import dataclass, field
from pathlib import Path

from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.inference.images import list_images

GOOD = "good"
BUILTIN_DATASETS = ("elpv",)


@dataclass(frozen=True)
class TestSample:
    path: Path
    defect_type: str  # "good" for nominal images
    mask: Path | None = None  # pixel ground truth, None where the data set has only image labels

    @property
    def label(self) -> int:
        return int(self.defect_type != GOOD)


@dataclass
class Dataset:
    name: str
    good: list[Path]  # nominal images to learn from
    test: list[TestSample] = field(default_factory=list)

    @property
    def has_masks(self) -> bool:
        return any(sample.mask is not None for sample in self.test)

    def check_masks(self) -> None:
        """Every defective test image of a data set with masks has its mask file: one missing would be scored as
        all-good pixels. One-line InspectError naming the first missing mask."""
        missing = [s for s in self.test if s.mask is not None and not s.mask.is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InspectError(f"{missing[0].mask}: mask missing for the defective test image {missing[0].path}"
                               f"{more}; add it, or move the image out of test/")


def split_fit_validation(paths: list[Path], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Deterministic, seeded split of good images into the fit set and held-out validation images."""
    if not 0 < val_fraction < 1:
        raise InspectError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if len(paths) < 5:
        raise InspectError(f"only {len(paths)} good images: need at least 5 to keep some for validation")
    order = sorted(paths)
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(order) * val_fraction))
    if n_val >= len(order):
        raise InspectError(f"--val-fraction {val_fraction:g} holds out all {len(order)} good images: none are left "
                           "to fit on; give a smaller fraction")
    return sorted(order[n_val:]), sorted(order[:n_val])


def open_dataset(spec: str) -> Dataset:
    """Resolve --data: a built-in name, an MVTec AD category folder, or a folder of good images."""
    if spec == "elpv":
        return _elpv()
    root = Path(spec)
    if (root / "train" / GOOD).is_dir():
        return _mvtec(root)
    return Dataset(root.name, list_images(root))


def _mvtec(root: Path) -> Dataset:
    """With a ground_truth/ folder every defective test image has a mask, ground_truth/<type>/NNN_mask.png (a
    missing one is an error where masks are used: Dataset.check_masks); without one the data set has image
    labels only."""
    good = list_images(root / "train" / GOOD)
    test = []
    test_root, masks = root / "test", root / "ground_truth"
    has_masks = masks.is_dir()
    if test_root.is_dir():
        for type_dir in sorted(p for p in test_root.iterdir() if p.is_dir()):
            for path in list_images(type_dir):
                mask = masks / type_dir.name / f"{path.stem}_mask.png"
                test.append(TestSample(path, type_dir.name, mask if type_dir.name != GOOD and has_masks else None))
    return Dataset(root.name, good, test)


def _elpv(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """Mono-crystalline cells: good ones (defect probability 0) split into train and test; cells rated
    defective (probability ≥ 2/3) are the defective test images. The uncertain 1/3 ratings are left out."""
    try:
        import elpv_dataset
    except ImportError:
        raise InspectError("--data elpv needs the PyPI package elpv-dataset: pip install -e '.[demo]'") from None
    data = Path(elpv_dataset.__file__).parent / "data"
    good, defective = [], []
    for line in (data / "labels.csv").read_text().splitlines():
        name, probability, cell_type = line.split()
        if cell_type != "mono":
            continue
        if float(probability) == 0:
            good.append(data / name)
        elif float(probability) > 0.5:
            defective.append(data / name)
    order = sorted(good)
    random.Random(seed).shuffle(order)
    n_test = round(len(order) * test_fraction)
    test = [TestSample(p, GOOD) for p in sorted(order[:n_test])] + [TestSample(p, "defective") for p in defective]
    return Dataset("elpv-mono", sorted(order[n_test:]), test)

