"""STPM's loss and map rules, and a short real-data training run."""

import torch
import torch.nn.functional as F

from edgeinspect.runtime.datasets import open_dataset, split_fit_validation
from edgeinspect.runtime.inference.images import load_resized
from edgeinspect.runtime.console import progress_bar
from edgeinspect.train.layers import upsample
from edgeinspect.train.stpm import STPMConfig, build_stpm, fit_stpm, level_maps

CONFIG = STPMConfig(image_size=(64, 64))


def random_images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_loss_is_zero_when_the_student_equals_the_teacher_and_positive_otherwise():
    model = build_stpm(CONFIG, pretrained=False).eval()
    images = random_images(2)
    teacher = model.teacher_features(images)
    assert model.loss(images, *teacher) > 1e-3
    model.student.load_state_dict(model.teacher.state_dict())
    assert model.loss(images, *teacher) < 1e-10


def test_level_map_is_half_the_squared_distance_of_normalised_features():
    t, s = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    expected = 0.5 * (F.normalize(t, dim=1) - F.normalize(s, dim=1)).pow(2).sum(1, keepdim=True)
    assert torch.allclose(level_maps([t], [s])[0], expected)


def test_anomaly_map_is_the_product_of_the_upsampled_level_maps():
    model = build_stpm(CONFIG, pretrained=False).eval()
    images = random_images(2, seed=1)
    with torch.no_grad():
        anomaly_map, score = model(images)
        x = model.image_input(images)
        levels = [upsample(m, (64, 64)) for m in level_maps(model.teacher(x), model.student(x))]
    assert anomaly_map.shape == (2, 1, 64, 64) and len(levels) == 3
    assert torch.allclose(anomaly_map, levels[0] * levels[1] * levels[2], rtol=1e-5)
    assert torch.allclose(score, anomaly_map.amax(dim=(1, 2, 3)))


def test_a_short_real_training_lowers_the_validation_loss(bottle):
    fit, validation = split_fit_validation(open_dataset(str(bottle)).good[:30], 0.2, 0)
    fit_images, _ = load_resized(fit, (64, 64))
    validation_images, _ = load_resized(validation, (64, 64))
    config = STPMConfig(image_size=(64, 64), epochs=4, batch_size=8, patience=4)
    with progress_bar() as bar:
        _, _, details = fit_stpm(config, fit_images, validation_images, None, bar, lambda *args: None)
    history = details["training"]["history"]
    assert len(history) == 4
    assert details["training"]["best_validation_loss"] < 0.8 * history[0]["validation_loss"]


def test_a_random_init_model_exports_with_parity(tmp_path):
    import numpy as np

    from edgeinspect.export.onnx_export import check_parity, export_onnx
    from edgeinspect.runtime.inference.bundle import Bundle

    model = build_stpm(CONFIG, pretrained=False).eval()
    export_onnx(model, tmp_path / "model.onnx", (64, 64), 17)
    bundle = Bundle(tmp_path, {"model_file": "model.onnx", "outputs": ["anomaly_map", "score"]})
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    assert check_parity(model, bundle, images)["relative_diff"] <= 1e-4
