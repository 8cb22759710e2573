import numpy as np
import pytest

from edgeinspect.calibration.metrics import at_threshold, aupro, auroc, f1_max, pro_curve


def test_aupro_is_one_for_a_perfect_map_and_low_for_an_inverted_one():
    masks = np.zeros((2, 20, 20), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 10:18, 10:12] = True
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0)
    assert aupro(1.0 - masks, masks) == pytest.approx(0.0)


def test_pro_counts_every_region_equally_whatever_its_size():
    masks = np.zeros((1, 10, 10), dtype=bool)
    masks[0, 0, 0] = True  # a 1-pixel region
    masks[0, 5:9, 5:9] = True  # a 16-pixel region
    maps = np.zeros((1, 10, 10))
    maps[0, 0, 0] = 1.0  # only the small region is found
    fpr, pro = pro_curve(maps, masks)
    assert pro[1] == pytest.approx(0.5) and fpr[1] == 0


def test_image_metrics():
    labels, scores = np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])
    assert auroc(labels, scores) == pytest.approx(0.75)
    assert auroc(np.zeros(3), scores[:3]) is None
    assert f1_max(labels, scores)["f1"] == pytest.approx(0.8)
    verdicts = at_threshold(labels, scores, 0.5)
    assert (verdicts["precision"], verdicts["recall"], verdicts["accuracy"]) == (1.0, 0.5, 0.75)
