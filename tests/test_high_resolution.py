"""Large and odd-shaped inputs: the scalable coreset against the exact one, the bounded bank, non-square maps
against a direct computation, masks at the map's size, and real magnetic_tile images of many sizes end to end."""

import json

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeinspect.calibration.cli import eval_app
from edgeinspect.calibration.evaluate import read_mask
from edgeinspect.runtime import datasets
from edgeinspect.runtime.datasets import open_dataset
from edgeinspect.runtime.inference.images import load_resized, read_image
from edgeinspect.train.patchcore import (MemoryBank, PatchCoreConfig, bank_neighbours,
                                         coverage_radius, extract_patches, greedy_coreset, pooled_greedy_coreset,
                                         random_projection, untrained_patchcore)
from test_layers import resize_then_blur

from conftest import calibrated_bundle, small_magnetic_tile


def test_pooled_coreset_still_takes_the_outliers_its_pool_missed():
    """20,000 points in one blob and 5 far outliers: a pool of 32 × 48 points almost surely misses them, the
    exact last eighth of the selection (6 centres) takes all five, and the coverage radius is the exact one's."""
    generator = torch.Generator().manual_seed(0)
    blob = torch.randn(20000, 8, generator=generator)
    outliers = 40 + 10 * torch.randn(5, 8, generator=generator)
    points = torch.cat([blob, outliers])
    chosen = pooled_greedy_coreset(points, 48, seed=0)
    assert set(range(20000, 20005)) <= set(chosen.tolist())
    assert len(set(chosen.tolist())) == 48
    exact = greedy_coreset(points, 48, seed=0)
    assert coverage_radius(points, points[chosen]) <= 1.05 * coverage_radius(points, points[exact])


@pytest.mark.slow
def test_pooled_coreset_covers_real_patches_as_well_as_the_exact_one(bottle):
    """Lite0 patch features of 24 real bottle images (6,144 patches), 1% kept: the pooled selection's coverage
    radius is within 5% of the exact greedy one's (on the full bottle set at 512×512, 684,032 patches, 2,048
    kept: 30.43 against 30.37, in 19 s instead of 59 s; BENCHMARKS.md)."""
    paths = open_dataset(str(bottle)).good[:24]
    images, _ = load_resized(paths, (128, 128))
    model = untrained_patchcore(PatchCoreConfig(image_size=(128, 128)))
    with torch.inference_mode():
        patches = extract_patches(model, images)
        projected = random_projection(patches, 128, seed=0)
        pooled, exact = pooled_greedy_coreset(projected, 61, seed=0), greedy_coreset(projected, 61, seed=0)
    assert patches.shape[0] > 32 * 61  # the pooled path, not the exact fallback
    assert coverage_radius(patches, patches[pooled]) <= 1.05 * coverage_radius(patches, patches[exact])


def test_bank_is_bounded_by_max_bank(mvtec_like, tmp_path):
    """20 images × 8×8 patches at 64×64 at ratio 1 would keep 1,024 entries: --max-bank 100 keeps 100."""
    from edgeinspect.train.cli import app

    result = CliRunner().invoke(app, ["patchcore", "--data", str(mvtec_like), "--out", str(tmp_path), "--image-size",
                                      "64", "--coreset-ratio", "1", "--max-bank", "100"])
    assert result.exit_code == 0, result.output
    bank = json.loads((tmp_path / "run.json").read_text())["memory_bank"]
    assert bank["entries"] == 100 and bank["patches"] > 100


def test_non_square_map_is_the_nearest_bank_distance_upsampled_and_blurred():
    """PatchCore at 64×160: its anomaly map equals each patch's brute-force nearest-bank distance, resized
    bilinearly to the input and blurred (σ=4), done the obvious way."""
    config = PatchCoreConfig(image_size=(64, 160))
    model = untrained_patchcore(config, pretrained=False)
    images = torch.randint(0, 256, (2, 64, 160, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        embedding = model.embed(images)
        bank = embedding[0].flatten(1).T[::3].contiguous()
        model.memory = MemoryBank(bank, bank_neighbours(bank, 9))
        anomaly_map, _ = model(images)
        queries = embedding.flatten(2).transpose(1, 2)
        nearest = torch.cdist(queries, bank[None].expand(2, -1, -1)).min(-1).values
        expected = resize_then_blur(nearest.view(2, 1, *embedding.shape[-2:]), (64, 160), config.sigma)
    assert anomaly_map.shape == (2, 1, 64, 160) and embedding.shape[-2:] == (8, 20)
    assert torch.allclose(anomaly_map, expected, atol=1e-3 * float(expected.max()))


def test_mask_is_sampled_at_each_map_pixels_centre(magnetic_tile):
    """A real magnetic_tile crack mask (0/255, not square) to a 96×160 map: each map pixel takes the mask pixel
    under its centre, so it stays 0/1 and thin cracks are not shifted."""
    sample = datasets.TestSample(magnetic_tile / "test" / "crack" / "000.jpg", "crack",
                        magnetic_tile / "ground_truth" / "crack" / "000_mask.png")
    mask = cv2.imread(str(sample.mask), cv2.IMREAD_GRAYSCALE)
    resized = read_mask(sample, mask.shape, (96, 160))
    rows = ((np.arange(96) + 0.5) * mask.shape[0] / 96).astype(int)
    cols = ((np.arange(160) + 0.5) * mask.shape[1] / 160).astype(int)
    assert resized.dtype == bool and np.array_equal(resized, mask[rows][:, cols] > 0)


@pytest.mark.slow
def test_tiles_of_many_sizes_train_export_calibrate_and_evaluate_non_square(magnetic_tile, tmp_path):
    """Real grayscale tiles of different sizes through inspect-train at 96×160, export, calibrate and eval: every
    test image is scored, the pixel metrics come from masks read at the map's size."""
    data = small_magnetic_tile(magnetic_tile, tmp_path)
    shapes = {read_image(p).shape[:2] for p in (data / "train" / "good").iterdir()}
    assert len(shapes) > 3  # the images really are of different sizes
    bundle = calibrated_bundle(tmp_path / "run", ["patchcore", "--data", data, "--image-size", "96x160"])
    result = CliRunner().invoke(eval_app, [str(bundle), "--data", str(data), "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    evaluation = json.loads((tmp_path / "eval.json").read_text())
    overall = evaluation["metrics"]["overall"]
    assert evaluation["n_images"] == 9 and overall["n_defective"] == 6
    assert overall["pixel_auroc"] > 0.5 and overall["image_auroc"] is not None
