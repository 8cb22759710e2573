"""inspect-train --device: auto/cpu/cuda, its one-line errors, the device recorded in run.json, a run folder that
holds CPU tensors, and (where PyTorch sees a CUDA GPU) GPU training that gives the CPU's model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from edgeinspect.calibration.metrics import auroc
from edgeinspect.runtime.inference.images import load_resized
from edgeinspect.train.cli import app as train_app
from edgeinspect.train.patchcore import (bank_neighbours, coverage_radius, extract_patches, greedy_coreset,
                                         random_projection)
from edgeinspect.train.registry import MODEL_KINDS
from edgeinspect.train.run import load_run

from conftest import QUICK_TRAINING

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible to PyTorch")


def train(kind: str, data: Path, out: Path, *options):
    args = [kind, "--data", data, "--out", out, "--image-size", 64, *QUICK_TRAINING[kind], *options]
    return CliRunner().invoke(train_app, [str(a) for a in args])


def assert_one_line_error(result, message: str, out: Path):
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()  # refused before any image was read or anything written


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_cpu_and_auto_record_the_device_trained_on(mvtec_like, tmp_path, device):
    result = train("autoencoder", mvtec_like, tmp_path, "--device", device)
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "run.json").read_text())["device"]
    assert (recorded == "cpu") if device == "cpu" or not CUDA else recorded.startswith("cuda:")
    assert f"on {recorded}" in result.output
    state = torch.load(tmp_path / "model.pt", weights_only=True)  # no map_location: as saved
    assert {tensor.device.type for tensor in state.values()} == {"cpu"}


@pytest.mark.skipif(CUDA, reason="a CUDA GPU is visible to PyTorch, so --device cuda is valid here")
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_cuda_without_a_gpu_is_a_one_line_error(mvtec_like, tmp_path, kind):
    result = train(kind, mvtec_like, tmp_path / "run", "--device", "cuda")
    assert_one_line_error(result, "--device cuda: PyTorch sees no CUDA GPU", tmp_path / "run")


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_an_unknown_device_is_a_one_line_error(mvtec_like, tmp_path, kind):
    result = train(kind, mvtec_like, tmp_path / "run", "--device", "tpu")
    assert_one_line_error(result, "--device 'tpu' is not one of auto, cpu, cuda", tmp_path / "run")


def scored_images(data: Path) -> tuple[np.ndarray, np.ndarray]:
    paths = sorted((data / "test" / "good").iterdir()) + sorted((data / "test" / "pasted").iterdir())
    images, kept = load_resized(paths, (64, 64))
    return images, np.array([path.parent.name != "good" for path in kept])


@needs_cuda
def test_projection_coreset_and_neighbours_follow_the_seed_on_the_gpu():
    """The same inputs on both devices: the same projection matrix and first coreset point (both drawn on the
    CPU), results on the inputs' device, and a coreset that covers the points as well."""
    points = torch.randn(4000, 256, generator=torch.Generator().manual_seed(0))
    projected = random_projection(points, 128, seed=0)
    on_gpu = random_projection(points.cuda(), 128, seed=0)
    assert on_gpu.is_cuda and torch.allclose(on_gpu.float().cpu(), projected.float(), rtol=1e-2, atol=1e-2)
    chosen, chosen_on_gpu = greedy_coreset(projected, 200, seed=3), greedy_coreset(projected.cuda(), 200, seed=3)
    assert chosen_on_gpu.is_cuda and int(chosen_on_gpu[0]) == int(chosen[0])
    radius = coverage_radius(projected, projected[chosen])
    assert coverage_radius(projected, projected[chosen_on_gpu.cpu()]) <= 1.05 * radius
    bank = points[chosen]
    neighbours, neighbours_on_gpu = bank_neighbours(bank, 9), bank_neighbours(bank.cuda(), 9)
    assert neighbours_on_gpu.is_cuda and torch.equal(neighbours_on_gpu[:, 0].cpu(), torch.arange(len(bank)))
    assert (neighbours_on_gpu.cpu() == neighbours).float().mean() > 0.99


@needs_cuda
@pytest.mark.parametrize("kind", list(MODEL_KINDS))
def test_training_on_the_gpu_gives_the_cpus_model_within_run_to_run_noise(mvtec_like, tmp_path, kind):
    """Same seed, same data, cpu then cuda. Every random choice (initial weights, shuffling, projection, first
    coreset point) is drawn on the CPU, so the runs differ only by floating-point rounding: cuDNN's TF32
    convolutions (about 1e-3 relative), other summation orders. The gradient kinds stay within a fraction of
    a percent. PatchCore's greedy coreset is chaotic: features 1e-3 apart make it leave the CPU's selection
    after a few of its 256 steps (simulated on the CPU: coverage radius within 3%, max |Δscore| within 4% of
    the score range, mean |Δmap| within 0.7% of the map range), as far as another seed does (radius 4.4%,
    scores 2.9%, maps 1.1%). So this proves the GPU run is as good a model as the CPU's, with the same first
    coreset point, and that its run folder holds CPU tensors like any other."""
    runs = {}
    for device in ("cpu", "cuda"):
        result = train(kind, mvtec_like, tmp_path / device, "--device", device)
        assert result.exit_code == 0, result.output
        runs[device] = load_run(tmp_path / device)
    (cpu_model, cpu_run), (gpu_model, gpu_run) = runs["cpu"], runs["cuda"]
    assert cpu_run["device"] == "cpu" and gpu_run["device"].startswith("cuda:")
    state = torch.load(tmp_path / "cuda" / "model.pt", weights_only=True)
    assert {tensor.device.type for tensor in state.values()} == {"cpu"}
    assert gpu_run["config"] == cpu_run["config"]  # DFR: the PCA picked the same bottleneck

    if kind == "patchcore":
        fit_images, _ = load_resized([Path(p) for p in cpu_run["data"]["fit"]], (64, 64))
        with torch.no_grad():
            patches = extract_patches(cpu_model, fit_images)
        cpu_bank, gpu_bank = cpu_model.memory.bank, gpu_model.memory.bank
        assert gpu_bank.shape == cpu_bank.shape
        assert torch.allclose(gpu_bank[0], cpu_bank[0], rtol=1e-2, atol=1e-2 * float(cpu_bank[0].abs().max()))
        assert coverage_radius(patches, gpu_bank) <= 1.05 * coverage_radius(patches, cpu_bank)

    images, defective = scored_images(mvtec_like)
    with torch.no_grad():
        (cpu_maps, cpu_scores), (gpu_maps, gpu_scores) = [model(torch.from_numpy(images))
                                                          for model in (cpu_model, gpu_model)]
    assert float((gpu_scores - cpu_scores).abs().max()) <= 0.06 * float(cpu_scores.max() - cpu_scores.min())
    assert float((gpu_maps - cpu_maps).abs().mean()) <= 0.02 * float(cpu_maps.max() - cpu_maps.min())
    assert abs(auroc(defective, gpu_scores.numpy()) - auroc(defective, cpu_scores.numpy())) <= 0.05
