"""DFR (Yang, Shi, Qi: "Deep Feature Reconstruction for Unsupervised Anomaly Segmentation"): regional
features of several backbone stages, and a cheap autoencoder of 1×1 convolutions that learns to reconstruct
them on good images; the reconstruction error locates what it has not seen."""

import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from edgeinspect.runtime.console import InspectError

from .backbones import FeatureExtractor, Normalization, create_feature_extractor
from .configs import GradientConfig
from .devices import CPU
from .fitting import fit_by_gradient, map_in_batches, mean_and_covariance
from .layers import ImageInput, MapToImage, upsample


@dataclass(frozen=True)
class DFRConfig(GradientConfig):
    backbone: str = "tf_efficientnet_lite0"
    strides: tuple[int, ...] = (2, 4, 8, 16)  # every stage up to stride 16
    grid_stride: int = 4  # the common grid the regional features are resized to
    region: int = 3  # average-pooling window of each stage, in that stage's positions
    latent_dim: int | None = None  # None: the PCA choice below, recorded after training
    variance_kept: float = 0.9
    sigma: float = 4.0
    image_size: tuple[int, int] = (256, 256)
    batch_size: int = 4
    learning_rate: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.variance_kept <= 1:
            raise InspectError(f"--variance-kept must be in (0, 1], got {self.variance_kept}")
        if self.region < 1 or self.region % 2 == 0:
            raise InspectError(f"--region must be an odd number of positions, got {self.region}")


class RegionalFeatures(nn.Module):
    """Each stage average-pooled over a region × region window (so a position describes its surroundings),
    resized to the common grid and concatenated channel-wise: (B, ΣC, H/grid, W/grid)."""

    def __init__(self, extractor: FeatureExtractor, grid_stride: int, region: int):
        super().__init__()
        self.extractor = extractor
        self.grid_stride = grid_stride
        self.pool = nn.AvgPool2d(region, stride=1, padding=region // 2, count_include_pad=False)
        self.channels = sum(extractor.channels)
        self.register_buffer("mean", torch.zeros(1, self.channels, 1, 1))
        self.register_buffer("std", torch.ones(1, self.channels, 1, 1))

    def standardise_on(self, features: torch.Tensor) -> None:
        """Scale each channel to zero mean and unit variance over the good images, so every stage counts in
        the reconstruction error, not just the one with the largest activations."""
        self.mean.copy_(features.mean(dim=(0, 2, 3), keepdim=True))
        self.std.copy_(features.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = (x.shape[2] // self.grid_stride, x.shape[3] // self.grid_stride)
        features = torch.cat([upsample(self.pool(f), grid) for f in self.extractor(x)], dim=1)
        return (features - self.mean) / self.std


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class FeatureAutoencoder(nn.Module):
    """C → (C+2L)/2 → 2L → L → 2L → (C+2L)/2 → C, all 1×1 convolutions (each position on its own)."""

    def __init__(self, channels: int, latent: int):
        super().__init__()
        hidden = (channels + 2 * latent) // 2
        self.encoder = nn.Sequential(*_conv_bn_relu(channels, hidden), *_conv_bn_relu(hidden, 2 * latent),
                                     nn.Conv2d(2 * latent, latent, 1))
        self.decoder = nn.Sequential(*_conv_bn_relu(latent, 2 * latent), *_conv_bn_relu(2 * latent, hidden),
                                     nn.Conv2d(hidden, channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(features))

    def loss(self, features: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(self(features), features)


def sampled_vectors(features: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """`count` random rows (count, C) of features (N, C, H, W) seen as the (N·H·W, C) matrix of their vectors,
    gathered without making that matrix (a copy as large as the features)."""
    flat = features.flatten(2)
    positions = flat.shape[2]
    rows = torch.randperm(len(flat) * positions, generator=torch.Generator().manual_seed(seed))[:count]
    rows = rows.to(features.device)
    return flat[rows // positions, :, rows % positions]


def latent_for_variance(features: torch.Tensor, variance_kept: float) -> int:
    """The number of principal components of features (N, C) that keep `variance_kept` of their variance."""
    eigenvalues = torch.linalg.eigvalsh(mean_and_covariance(features)[1]).flip(0).clamp_min(0)
    kept = torch.cumsum(eigenvalues, 0) / eigenvalues.sum()
    return int(torch.searchsorted(kept, torch.tensor(variance_kept - 1e-12, dtype=kept.dtype, device=kept.device))) + 1


class DFR(nn.Module):
    """uint8 RGB images (B, H, W, 3) → anomaly_map (B, 1, H, W): per-position squared reconstruction error
    summed over channels, upsampled and smoothed; score (B,): its maximum."""

    half_precision_modules = ("regional.extractor", "autoencoder")

    def __init__(self, regional: RegionalFeatures, normalization: Normalization, autoencoder: FeatureAutoencoder,
                 sigma: float):
        super().__init__()
        self.image_input = ImageInput(normalization)
        self.regional = regional.eval().requires_grad_(False)
        self.autoencoder = autoencoder
        self.to_image = MapToImage(sigma)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.regional(self.image_input(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images)
        error = ((features - self.autoencoder(features)) ** 2).sum(1, keepdim=True)
        anomaly_map = self.to_image(error, images.shape[1:3])
        return anomaly_map, anomaly_map.amax(dim=(1, 2, 3))


def build_dfr(config: DFRConfig, latent_dim: int, weights=None, pretrained: bool = True) -> DFR:
    extractor, normalization = create_feature_extractor(config.backbone, config.strides, weights, pretrained)
    regional = RegionalFeatures(extractor, config.grid_stride, config.region)
    return DFR(regional, normalization, FeatureAutoencoder(regional.channels, latent_dim), config.sigma)


def restore_dfr(config: DFRConfig, state: dict) -> DFR:
    model = build_dfr(config, config.latent_dim, pretrained=False)
    model.load_state_dict(state)
    return model


def fit_dfr(config: DFRConfig, fit_images: np.ndarray, validation_images: np.ndarray, weights, bar: Progress,
            checkpoint, device: torch.device = CPU) -> tuple[DFR, DFRConfig, dict]:
    """Adam on the autoencoder over regional features computed once (the backbone is frozen); the latent width
    comes from PCA on the fit features unless the configuration gives it. Features, PCA and training run on
    `device`; the autoencoder is initialised on the CPU, so it starts the same whatever the device."""
    torch.manual_seed(config.seed)
    model = build_dfr(config, latent_dim=1, weights=weights).to(device)
    if config.latent_dim is not None and config.latent_dim > model.regional.channels:  # before the features
        raise InspectError(f"--latent-dim {config.latent_dim} is more than the {model.regional.channels} regional "
                           f"feature channels of {config.backbone}")
    task = bar.add_task("regional features", total=len(fit_images) + len(validation_images))
    fit, validation = [map_in_batches(model.features, images, progress=lambda n: bar.advance(task, n),
                                      device=device)[0] for images in (fit_images, validation_images)]
    model.regional.standardise_on(fit)
    for features in (fit, validation):  # in place, as the features are the largest thing held in memory
        features.sub_(model.regional.mean).div_(model.regional.std)
    clock = time.perf_counter()
    if config.latent_dim is None:
        vectors = sampled_vectors(fit, 200_000, config.seed)
        config = replace(config, latent_dim=latent_for_variance(vectors, config.variance_kept))
    pca_s = time.perf_counter() - clock
    model.autoencoder = FeatureAutoencoder(model.regional.channels, config.latent_dim).to(device)
    optimizer = torch.optim.Adam(model.autoencoder.parameters(), lr=config.learning_rate)
    summary = fit_by_gradient(model.autoencoder, model.autoencoder.loss, optimizer, (fit,), (validation,),
                              config, bar, on_best=lambda progress: checkpoint(model, config, {"training": progress}))
    return model.eval().cpu(), config, {"training": summary, "timings": {"pca_s": round(pca_s, 2)}}
