"""STPM (Wang et al., "Student-Teacher Feature Pyramid Matching for Anomaly Detection"): a student with the
teacher's architecture, randomly initialised, learns to reproduce the frozen pretrained teacher's normalised
features on good images only; where it cannot, the part looks unlike anything it was trained on."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from edgeinspect.runtime.console import InspectError

from .backbones import FeatureExtractor, Normalization, create_feature_extractor
from .configs import GradientConfig
from .devices import CPU
from .fitting import fit_by_gradient, map_in_batches
from .layers import ImageInput, MapToImage


@dataclass(frozen=True)
class STPMConfig(GradientConfig):
    backbone: str = "tf_efficientnet_lite0"
    strides: tuple[int, ...] = (4, 8, 16)  # the first three stages
    level_weights: tuple[float, ...] = (1.0, 1.0, 1.0)
    image_size: tuple[int, int] = (256, 256)
    learning_rate: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if len(self.level_weights) != len(self.strides):
            raise InspectError(f"--level-weights: {len(self.level_weights)} weights for {len(self.strides)} levels")


def level_maps(teacher: list[torch.Tensor], student: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per level, ½‖t̂ − ŝ‖² of the L2-normalised feature vectors at each position: (B, 1, h, w)."""
    return [0.5 * ((F.normalize(t, dim=1) - F.normalize(s, dim=1)) ** 2).sum(1, keepdim=True)
            for t, s in zip(teacher, student)]


class STPM(nn.Module):
    """uint8 RGB images (B, H, W, 3) → anomaly_map (B, 1, H, W), the product of the upsampled level maps, and
    score (B,), its maximum."""

    half_precision_modules = ("teacher", "student")

    def __init__(self, teacher: FeatureExtractor, student: FeatureExtractor, normalization: Normalization,
                 level_weights: tuple[float, ...]):
        super().__init__()
        self.image_input = ImageInput(normalization)
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.level_weights = level_weights
        self.to_image = MapToImage()

    def train(self, mode: bool = True) -> "STPM":
        super().train(mode)
        self.teacher.eval()  # frozen: its BatchNorm statistics are the pretrained ones
        return self

    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.teacher(self.image_input(images))

    def loss(self, images: torch.Tensor, *teacher: torch.Tensor) -> torch.Tensor:
        """Weighted sum over levels of the per-position loss averaged over positions and images."""
        maps = level_maps(list(teacher), self.student(self.image_input(images)))
        return sum(weight * level.mean() for weight, level in zip(self.level_weights, maps))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.image_input(images)
        size = images.shape[1:3]
        anomaly_map = None
        for level in level_maps(self.teacher(x), self.student(x)):
            level = self.to_image(level, size)
            anomaly_map = level if anomaly_map is None else anomaly_map * level
        return anomaly_map, anomaly_map.amax(dim=(1, 2, 3))


def build_stpm(config: STPMConfig, weights=None, pretrained: bool = True) -> STPM:
    teacher, normalization = create_feature_extractor(config.backbone, config.strides, weights, pretrained)
    student, _ = create_feature_extractor(config.backbone, config.strides, pretrained=False)
    return STPM(teacher, student, normalization, config.level_weights)


def restore_stpm(config: STPMConfig, state: dict) -> STPM:
    model = build_stpm(config, pretrained=False)
    model.load_state_dict(state)
    return model


def fit_stpm(config: STPMConfig, fit_images: np.ndarray, validation_images: np.ndarray, weights, bar: Progress,
             checkpoint, device: torch.device = CPU) -> tuple[STPM, STPMConfig, dict]:
    """SGD on the student; the teacher's features of every image are computed once (the teacher is frozen
    and there is no augmentation), which saves a quarter of each epoch. The student is initialised on the CPU,
    so it starts from the same weights whatever `device` trains it."""
    torch.manual_seed(config.seed)
    model = build_stpm(config, weights).to(device)
    task = bar.add_task("teacher features", total=len(fit_images) + len(validation_images))

    def with_teacher_features(images: np.ndarray) -> tuple[torch.Tensor, ...]:
        features = map_in_batches(model.teacher_features, images, progress=lambda n: bar.advance(task, n),
                                  device=device)
        return (torch.from_numpy(images).to(device), *features)

    fit, validation = with_teacher_features(fit_images), with_teacher_features(validation_images)
    optimizer = torch.optim.SGD(model.student.parameters(), lr=config.learning_rate, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    summary = fit_by_gradient(model, model.loss, optimizer, fit, validation, config, bar,
                              on_best=lambda progress: checkpoint(model, config, {"training": progress}))
    return model.eval().cpu(), config, {"training": summary}
