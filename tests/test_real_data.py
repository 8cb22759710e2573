"""Accuracy claims on real images with the real Lite0 ImageNet weights (marked slow; they run in CI)."""

import numpy as np
import pytest

from edgeinspect.calibration.evaluate import evaluate, predict
from edgeinspect.export.onnx_export import export_bundle
from edgeinspect.runtime.datasets import Dataset, open_dataset
from edgeinspect.train.patchcore import PatchCoreConfig
from edgeinspect.train.run import train_model


@pytest.mark.slow
def test_patchcore_on_a_bottle_subset_detects_real_defects(bottle, tmp_path):
    full = open_dataset(str(bottle))
    rng = np.random.default_rng(0)
    subset = Dataset(full.name, sorted(rng.choice(full.good, 60, replace=False)),
                     [s for i, s in enumerate(full.test) if i % 2 == 0])
    train_model("patchcore", PatchCoreConfig(image_size=(192, 192)), subset, tmp_path)
    bundle = export_bundle(tmp_path)
    result = evaluate(bundle, predict(bundle, subset), subset.name)
    overall = result["metrics"]["overall"]
    assert overall["image_auroc"] >= 0.95
    assert overall["pixel_auroc"] >= 0.9


@pytest.mark.slow
def test_elpv_builtin_dataset_has_real_good_and_defective_cells():
    dataset = open_dataset("elpv")
    labels = [s.label for s in dataset.test]
    assert len(dataset.good) > 400 and 0 < sum(labels) < len(labels)
    assert not set(dataset.good) & {s.path for s in dataset.test}
