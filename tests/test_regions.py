import numpy as np
from scipy import ndimage

from edgeinspect.runtime.inference.regions import find_regions


def test_regions_are_the_connected_components_with_their_area_and_peak():
    anomaly_map = np.zeros((64, 64), np.float32)
    anomaly_map[5:15, 10:30] = 2.0  # 200 pixels
    anomaly_map[8, 12] = 5.0
    anomaly_map[40:44, 40:43] = 3.0  # 12 pixels
    regions = find_regions(anomaly_map, 1.0)
    assert [r.to_dict() for r in regions] == [
        {"x": 10, "y": 5, "width": 20, "height": 10, "area": 200, "peak": 5.0},
        {"x": 40, "y": 40, "width": 3, "height": 4, "area": 12, "peak": 3.0},
    ]
    assert find_regions(anomaly_map, 6.0) == []


def test_regions_match_ndimage_per_label_statistics_on_a_noisy_map():
    anomaly_map = ndimage.gaussian_filter(np.random.default_rng(0).random((128, 128)).astype(np.float32), 1.5)
    threshold = float(np.quantile(anomaly_map, 0.9))
    labels, count = ndimage.label(anomaly_map > threshold)
    index = np.arange(1, count + 1)
    expected = sorted(zip(ndimage.sum_labels(np.ones_like(anomaly_map), labels, index).astype(int),
                          ndimage.maximum(anomaly_map, labels, index)), key=lambda pair: -pair[0])
    regions = find_regions(anomaly_map, threshold)
    assert count > 10 and len(regions) == count
    assert [r.area for r in regions] == [area for area, _ in expected]
    assert sorted(r.peak for r in regions) == sorted(float(peak) for _, peak in expected)
