"""The naive baseline: a convolutional autoencoder on pixels. Anomaly map = per-pixel squared error between
the image and its reconstruction, averaged over channels; score = the map's mean. It shows, next to the
feature-space models, why reconstructing pixels is a weak detector."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from edgeinspect.runtime.console import InspectError

from .backbones import Normalization
from .configs import GradientConfig
from .devices import CPU
from .fitting import fit_by_gradient
from .layers import ImageInput

UNIT_RANGE = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # pixels scaled to [0, 1]


@dataclass(frozen=True)
class AutoencoderConfig(GradientConfig):
    image_size: tuple[int, int] = (256, 256)
    widths: tuple[int, ...] = (16, 32, 64, 128)  # one stride-2 convolution each
    latent_channels: int = 32  # bottleneck: latent_channels × (H/16) × (W/16) numbers per image
    batch_size: int = 16
    learning_rate: float = 1e-3

    @property
    def input_step(self) -> int:
        return 2 ** len(self.widths)

    def __post_init__(self):
        super().__post_init__()
        if self.image_size is not None and any(side % self.input_step for side in self.image_size):
            raise InspectError(f"--image-size {self.image_size}: the autoencoder needs multiples of {self.input_step}")


class PixelAutoencoder(nn.Module):
    """uint8 RGB images (B, H, W, 3) → anomaly_map (B, 1, H, W) and score (B,)."""

    half_precision_modules = ("encoder", "decoder")

    def __init__(self, widths: tuple[int, ...], latent_channels: int):
        super().__init__()
        self.image_input = ImageInput(UNIT_RANGE)
        down, up = [], []
        channels = [3, *widths]
        for cin, cout in zip(channels, channels[1:]):
            down += [nn.Conv2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2, True)]
            up = [nn.ConvTranspose2d(cout, cin, 4, stride=2, padding=1)] + (
                [nn.BatchNorm2d(cin), nn.ReLU(True)] if up else [nn.Sigmoid()]) + up
        self.encoder = nn.Sequential(*down, nn.Conv2d(widths[-1], latent_channels, 1))
        self.decoder = nn.Sequential(nn.Conv2d(latent_channels, widths[-1], 1), nn.ReLU(True), *up)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        x = self.image_input(images)
        return F.mse_loss(self.reconstruct(x), x)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.image_input(images)
        anomaly_map = ((x - self.reconstruct(x)) ** 2).mean(1, keepdim=True)
        return anomaly_map, anomaly_map.mean(dim=(1, 2, 3))


def restore_autoencoder(config: AutoencoderConfig, state: dict) -> PixelAutoencoder:
    model = PixelAutoencoder(config.widths, config.latent_channels)
    model.load_state_dict(state)
    return model


def fit_autoencoder(config: AutoencoderConfig, fit_images: np.ndarray, validation_images: np.ndarray, weights,
                    bar: Progress, checkpoint,
                    device: torch.device = CPU) -> tuple[PixelAutoencoder, AutoencoderConfig, dict]:
    """Adam on the reconstruction error of the good images; no pretrained weights are involved. The weights are
    initialised on the CPU, so they start the same whatever `device` trains them."""
    torch.manual_seed(config.seed)
    model = PixelAutoencoder(config.widths, config.latent_channels).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    fit, validation = [(torch.from_numpy(images).to(device),) for images in (fit_images, validation_images)]
    summary = fit_by_gradient(model, model.loss, optimizer, fit, validation, config, bar,
                              on_best=lambda progress: checkpoint(model, config, {"training": progress}))
    return model.eval().cpu(), config, {"training": summary}
