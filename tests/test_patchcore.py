import json
import shutil

import pytest
import torch

from edgeinspect.runtime.console import InspectError
from edgeinspect.train.backbones import IMAGENET, INCEPTION
from edgeinspect.train.fitting import mean_and_covariance
from edgeinspect.train.patchcore import (FeatureProjection, MemoryBank, PatchCoreConfig, bank_neighbours,
                                         greedy_coreset, principal_components, random_projection,
                                         untrained_patchcore)
from edgeinspect.train.run import load_run


def test_greedy_coreset_takes_one_point_from_each_far_cluster():
    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0], [100.0, 100.0]])
    points = (centers.repeat_interleave(50, 0) + torch.randn(200, 2, generator=generator)).contiguous()
    chosen = greedy_coreset(points, 4, seed=0)
    assert sorted((chosen // 50).tolist()) == [0, 1, 2, 3]
    assert torch.equal(chosen, greedy_coreset(points, 4, seed=0))


def test_random_projection_roughly_keeps_distances():
    x = torch.randn(500, 256, generator=torch.Generator().manual_seed(1))
    y = random_projection(x, 128, seed=0).float()
    ratio = torch.cdist(y[:50], y[50:100]) / torch.cdist(x[:50], x[50:100])
    assert y.shape == (500, 128) and 0.8 < ratio.median() < 1.2


def test_nearest_matches_brute_force_and_is_never_nan():
    generator = torch.Generator().manual_seed(2)
    bank, queries = torch.randn(300, 16, generator=generator), torch.randn(2, 50, 16, generator=generator)
    memory = MemoryBank(bank, bank_neighbours(bank, 9))
    distances = memory.distances(queries)
    brute = torch.cdist(queries, bank[None].expand(2, -1, -1))
    assert torch.allclose(distances, brute.min(-1).values, atol=1e-4)
    zero = memory.distances(bank[:5][None])
    assert torch.isfinite(zero).all() and zero.max() < 1e-2
    memory.block_rows = 20  # blocks of 20, 20 and 10 patches give the same distances
    assert torch.equal(memory.distances(queries), distances)


def test_projection_is_pca_of_the_training_patches():
    """Against scikit-learn's PCA on correlated data: the same mean and directions (up to sign), computed over
    chunks; the projection in the graph gives PCA's coordinates; dim 0 keeps the features as they are."""
    from sklearn.decomposition import PCA

    generator = torch.Generator().manual_seed(3)
    features = torch.randn(5000, 12, generator=generator) @ torch.randn(12, 12, generator=generator) + 3
    mean, components = principal_components(features, 4)
    reference = PCA(4).fit(features.double().numpy())
    assert torch.allclose(mean, torch.from_numpy(reference.mean_), atol=1e-9)
    assert torch.allclose(components.T.abs(), torch.from_numpy(reference.components_).abs(), atol=1e-6)
    projected = FeatureProjection(mean, components)(features[None])[0].double()
    expected = torch.from_numpy(reference.transform(features.double().numpy()))
    assert torch.allclose(projected.abs(), expected.abs(), atol=1e-3)
    chunked_mean, chunked = mean_and_covariance(features, chunk=777)
    assert torch.allclose(chunked, mean_and_covariance(features)[1]) and torch.allclose(chunked_mean, mean)
    identity = FeatureProjection(*principal_components(features, 0))
    assert torch.equal(identity(features), features)


def test_bank_neighbours_put_each_entry_first_then_its_nearest():
    bank = torch.tensor([[0.0], [1.0], [10.0], [11.5]])
    assert bank_neighbours(bank, 2).tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]


def test_image_score_is_the_papers_reweighted_maximum():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    memory = MemoryBank(bank, bank_neighbours(bank, 3))
    queries = torch.tensor([[[0.1, 0.0], [2.0, 0.0]]])
    score = memory.image_score(queries, memory.distances(queries))
    worst = torch.tensor([2.0, 0.0])
    support = bank[bank_neighbours(bank, 3)[1]]
    weight = 1 - torch.softmax((support - worst).norm(dim=1), 0)[0]
    assert score.item() == pytest.approx((weight * 1.0).item(), rel=1e-5)


@pytest.mark.parametrize("choice, expected", [("imagenet", IMAGENET), ("backbone", INCEPTION)])
def test_input_normalization_is_imagenet_or_what_the_weights_expect(choice, expected):
    model = untrained_patchcore(PatchCoreConfig(normalization=choice), pretrained=False)
    assert model.image_input.normalization == expected
    with pytest.raises(InspectError, match="--normalization 'lab'"):
        PatchCoreConfig(normalization="lab")


def test_run_from_before_the_setting_keeps_the_normalization_it_was_fitted_with(patchcore_bundle, tmp_path):
    run_dir = shutil.copytree(patchcore_bundle.parent, tmp_path / "run", ignore=shutil.ignore_patterns("bundle"))
    record = json.loads((run_dir / "run.json").read_text())
    del record["config"]["normalization"]
    record["normalization"] = INCEPTION.to_dict()
    (run_dir / "run.json").write_text(json.dumps(record))
    model, _ = load_run(run_dir)
    assert model.image_input.normalization == INCEPTION


def test_image_score_is_the_maximum_of_the_anomaly_map_or_the_reweighted_distance(patchcore_bundle, tmp_path):
    """Today's runs score an image by the highest value of the map the operator sees; a run.json from before the
    setting (no image_score key) keeps the reweighted score it was calibrated with."""
    model, _ = load_run(patchcore_bundle.parent)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        anomaly_map, score = model(images)
        assert torch.equal(score, anomaly_map.amax(dim=(1, 2, 3)))
        run_dir = shutil.copytree(patchcore_bundle.parent, tmp_path / "run", ignore=shutil.ignore_patterns("bundle"))
        record = json.loads((run_dir / "run.json").read_text())
        del record["config"]["image_score"]
        (run_dir / "run.json").write_text(json.dumps(record))
        old, _ = load_run(run_dir)
        old_map, old_score = old(images)
        queries = old.projection(old.embed(images).flatten(2).transpose(1, 2))
        reweighted = old.memory.image_score(queries, old.memory.distances(queries))
    assert old.image_score == "reweighted" and torch.equal(old_map, anomaly_map)
    assert torch.allclose(old_score, reweighted) and not torch.allclose(old_score, score)
    with pytest.raises(InspectError, match="--image-score 'mean'"):
        PatchCoreConfig(image_score="mean")


def test_a_run_from_before_the_principal_components_still_loads(mvtec_like, tmp_path):
    """model.pt of older runs has no projection: restored, it compares every channel with the bank, as before
    (same map and score as the run with --feature-dim 0 it is made from)."""
    from typer.testing import CliRunner

    from edgeinspect.train.cli import app

    result = CliRunner().invoke(app, ["patchcore", "--data", str(mvtec_like), "--out", str(tmp_path), "--image-size",
                                      "64", "--feature-dim", "0"])
    assert result.exit_code == 0, result.output
    model, _ = load_run(tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("projection.")}, tmp_path / "model.pt")
    old, _ = load_run(tmp_path)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        (new_map, new_score), (old_map, old_score) = model(images), old(images)
    assert old.memory.bank.shape[1] == 152 and torch.equal(new_map, old_map) and torch.equal(new_score, old_score)


def test_a_finer_stage_joins_the_patch_grid_as_block_averages():
    """strides (4, 8, 16) on the stride-8 grid: the stride-4 features (3×3 local averages) averaged over 2×2 blocks,
    the stride-8 ones as they are, the stride-16 ones upsampled; the same grid and patch count as (8, 16)."""
    config = PatchCoreConfig(strides=(4, 8, 16), patch_stride=8)
    model = untrained_patchcore(config, pretrained=False)
    images = torch.randint(0, 256, (1, 64, 96, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        embedding = model.embed(images)
        stride_4, stride_8, stride_16 = [model.embedding.local_average(f)
                                         for f in model.embedding.extractor(model.image_input(images))]
    channels = stride_4.shape[1]
    assert embedding.shape[-2:] == (8, 12) == stride_8.shape[-2:]
    assert torch.allclose(embedding[:, :channels], stride_4.unfold(2, 2, 2).unfold(3, 2, 2).mean((-1, -2)), atol=1e-5)
    assert torch.allclose(embedding[:, channels:channels + stride_8.shape[1]], stride_8)
    assert embedding.shape[1] == channels + stride_8.shape[1] + stride_16.shape[1]
    with pytest.raises(InspectError, match="patch_stride 2"):
        PatchCoreConfig(strides=(4, 8, 16), patch_stride=2)
