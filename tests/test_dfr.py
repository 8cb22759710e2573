"""DFR: the PCA choice of the bottleneck, and reconstruction error on a real image with a pasted foreign patch."""

import numpy as np
import pytest
import skimage.data
import torch

from edgeinspect.runtime.console import progress_bar
from edgeinspect.runtime.datasets import open_dataset, split_fit_validation
from edgeinspect.runtime.inference.images import load_resized, read_image, resize
from edgeinspect.train.dfr import DFRConfig, fit_dfr, latent_for_variance, sampled_vectors


def features_with_variances(variances: list[float], dim: int = 32, count: int = 20000) -> torch.Tensor:
    """Features (count, dim) whose principal variances are `variances` (then zero), in a random basis."""
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
    components = torch.randn(count, len(variances), generator=generator)
    components = (components - components.mean(0)) / components.std(0) * torch.tensor(variances).sqrt()
    return components @ basis[:, :len(variances)].T + 5.0


@pytest.mark.parametrize("kept, expected", [(0.5, 1), (0.8, 2), (0.9, 3), (0.999, 4)])
def test_pca_latent_keeps_the_asked_variance(kept, expected):
    features = features_with_variances([50.0, 30.0, 15.0, 5.0])  # cumulative 0.5, 0.8, 0.95, 1.0
    assert latent_for_variance(features, kept) == expected


def test_pca_latent_never_exceeds_the_rank():
    features = features_with_variances([1.0] * 6)
    assert latent_for_variance(features, 1.0) == 6


def test_reconstruction_error_is_higher_where_a_foreign_patch_was_pasted(bottle):
    fit, validation = split_fit_validation(open_dataset(str(bottle)).good[:40], 0.2, 0)
    size = (128, 128)
    fit_images, _ = load_resized(fit, size)
    validation_images, _ = load_resized(validation, size)
    config = DFRConfig(image_size=size, epochs=15, batch_size=4, learning_rate=1e-3)
    with progress_bar() as bar:
        model, used, _ = fit_dfr(config, fit_images, validation_images, None, bar, lambda *args: None)
    assert used.latent_dim is not None and used.latent_dim < model.regional.channels
    clean = resize(read_image(bottle / "test" / "good" / "000.png"), size)
    pasted = clean.copy()
    pasted[40:72, 40:72] = skimage.data.brick()[:32, :32, None]
    with torch.no_grad():
        maps, scores = model(torch.from_numpy(np.stack([clean, pasted])))
    assert scores[1] > 1.5 * scores[0]
    inside, outside = maps[1, 0, 40:72, 40:72].mean(), maps[1, 0, 90:, 90:].mean()
    assert inside > 3 * outside


def test_sampled_vectors_are_rows_of_the_feature_matrix_without_making_it():
    features = torch.randn(3, 5, 4, 6)
    matrix = features.permute(0, 2, 3, 1).reshape(-1, 5)  # the copy the sampling avoids
    rows = torch.randperm(len(matrix), generator=torch.Generator().manual_seed(7))[:40]
    assert torch.equal(sampled_vectors(features, 40, seed=7), matrix[rows])
