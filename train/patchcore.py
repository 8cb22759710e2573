"""PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection"), one piece per step:
locally aware patch features → their principal components → greedy coreset memory bank → nearest-neighbour
distances → a smoothed anomaly map and the image score (the map's maximum, or the paper's reweighting). The
whole forward pass exports to one ONNX graph."""

import time
import typing
from dataclasses import dataclass

import numpy as np
import torch
from rich.progress import Progress
from torch import nn

from edgeinspect.runtime.console import InspectError

from .backbones import (INPUT_NORMALIZATIONS, FeatureExtractor, Normalization, create_feature_extractor,
                        input_normalization)
from .configs import ModelConfig, check_seed
from .devices import CPU, elapsed_s
from .fitting import map_in_batches, mean_and_covariance
from .layers import ImageInput, MapToImage, upsample


IMAGE_SCORES = ("map-max", "reweighted")


@dataclass(frozen=True)
class PatchCoreConfig(ModelConfig):
    backbone: str = "tf_efficientnet_lite0"
    strides: tuple[int, ...] = (8, 16)  # two mid-level stages
    # the patches' grid (0: the finest stage's). 8 with strides (4, 8, 16) adds the stride-4 stage averaged over 2×2
    # blocks at the same search cost: bottle at 448×448 AUPRO 0.965 against 0.958, but magnetic_tile image AUROC 0.918
    # against 0.935 (BENCHMARKS.md, "The input's size from the data"), so not the default
    patch_stride: int = 0
    image_size: tuple[int, int] = (256, 256)
    coreset_ratio: float = 0.1  # the paper's 10%; in practice the bound below decides the bank's size
    # at most this many bank entries, whatever the patch count: per-frame cost then grows with the pixels and not
    # with their square (512×512: 4× the patches of 256×256 against the same bank). 3,648 entries of 64 values
    # cost the search what 1,536 of Lite0's 152 channels did
    coreset_max_entries: int = 3648
    # patch features are reduced to their first principal components (fitted on the training patches) before the
    # bank, so the same search cost holds 2.4× the entries: magnetic_tile image AUROC 0.929 against 0.902 with all
    # 152 channels, bottle AUPRO 0.936 against 0.935, solar cells 0.949 against 0.930 (BENCHMARKS.md, the choices
    # table); 0: keep all
    feature_dim: int = 64
    projection_dim: int = 128  # random projection to pick the coreset, only where features have more dimensions
    num_neighbours: int = 9  # bank neighbourhood used by the reweighted image score
    sigma: float = 4.0
    seed: int = 0
    # what the backbone's weights were trained with ((x - 0.5) / 0.5 for Lite0): on magnetic_tile image AUROC 0.923
    # against 0.840 with ImageNet statistics, and 0.93 against 0.66 on a held-out MVTec AD category; bottle's AUPRO
    # is 0.005 lower (BENCHMARKS.md, "Choosing PatchCore's defaults")
    normalization: str = "backbone"
    # the image's score: the highest value of its (smoothed, full-size) anomaly map, what the operator sees; or the
    # paper's reweighted worst-patch distance. Through the bundle, magnetic_tile image AUROC 0.935 against 0.929
    # (0.910 against 0.895 at 512×512), solar cells 0.947 against 0.948 (0.943 against 0.936), bottle equal
    # (BENCHMARKS.md, "Choosing PatchCore's defaults")
    image_score: str = "map-max"
    # (a run without a projection in model.pt keeps every channel: restore_patchcore reads that from the state)
    missing_means: typing.ClassVar[dict] = {"image_score": "reweighted"}

    def __post_init__(self):
        check_seed(self.seed)
        if self.normalization not in INPUT_NORMALIZATIONS:
            raise InspectError(f"--normalization {self.normalization!r} is not one of {', '.join(INPUT_NORMALIZATIONS)}")
        if self.image_score not in IMAGE_SCORES:
            raise InspectError(f"--image-score {self.image_score!r} is not one of {', '.join(IMAGE_SCORES)}")
        if not 0 < self.coreset_ratio <= 1:
            raise InspectError(f"--coreset-ratio must be in (0, 1], got {self.coreset_ratio}")
        if not 1 <= self.coreset_max_entries <= 1 << 20:
            raise InspectError(f"--max-bank must be between 1 and {1 << 20}, got {self.coreset_max_entries}")
        if self.patch_stride and self.patch_stride not in self.strides:
            raise InspectError(f"patch_stride {self.patch_stride} is not one of the strides {self.strides} (or 0)")
        if not 0 <= self.feature_dim <= 4096:
            raise InspectError(f"--feature-dim must be between 0 (all channels) and 4096, got {self.feature_dim}")


class PatchEmbedding(nn.Module):
    """Locally aware patch features: each stage averaged over 3×3 neighbourhoods, brought to the grid of
    `patch_stride` (finer stages averaged over whole blocks, coarser ones upsampled) and concatenated
    channel-wise."""

    def __init__(self, extractor: FeatureExtractor, patch_stride: int | None = None):
        super().__init__()
        self.extractor = extractor
        self.local_average = nn.AvgPool2d(3, stride=1, padding=1)
        self.dim = sum(extractor.channels)
        self.patch_stride = patch_stride or extractor.strides[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.local_average(f) for f in self.extractor(x)]
        on_grid = [f if s == self.patch_stride else torch.nn.functional.avg_pool2d(f, self.patch_stride // s)
                   for f, s in zip(features, self.extractor.strides) if s <= self.patch_stride]
        grid = on_grid[0].shape[-2:]
        coarser = [upsample(f, grid) for f, s in zip(features, self.extractor.strides) if s > self.patch_stride]
        return torch.cat(on_grid + coarser, dim=1)


class FeatureProjection(nn.Module):
    """Patch features (B, P, C) → their coordinates on the training patches' first principal components (B, P, k):
    one MatMul and one Add in the graph. `components` is (C, k); identity where there are none (--feature-dim 0)."""

    def __init__(self, mean: torch.Tensor, components: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", components.float().contiguous())
        self.register_buffer("bias", -(mean.float() @ self.weight))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features @ self.weight + self.bias if self.weight.numel() else features


def principal_components(patches: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (C,) and the first `dim` principal directions (C, dim) of patches (N, C), largest variance first, on
    the patches' device. dim 0 (or ≥ C): no directions (and no covariance computed), every channel is kept."""
    channels = patches.shape[1]
    if not 0 < dim < channels:
        return torch.zeros(channels, device=patches.device), torch.zeros(channels, 0, device=patches.device)
    mean, covariance = mean_and_covariance(patches)
    return mean, torch.linalg.eigh(covariance)[1][:, -dim:].flip(1)  # eigh: ascending eigenvalues


def fit_projection(patches: torch.Tensor, dim: int) -> FeatureProjection:
    """The projection training puts before the bank, fitted on patches (N, C), on their device."""
    return FeatureProjection(*principal_components(patches, dim)).to(patches.device)


class MemoryBank(nn.Module):
    """Nearest-neighbour patch distances against the coreset, and the paper's reweighted image score.

    Squared distances are ‖q‖² − 2·q·Mᵀ + ‖m‖²: one Gemm (the −2·Mᵀ product with ‖m‖² as its bias) and a Min
    over the bank, with ‖q‖² added after the Min (it is the same for every entry) and a clamp at 0 before the
    square root, so the exported graph never materialises an N×M×C tensor. The patches go through in blocks
    whose N×M distances (about 2 MB) stay in the CPU's cache between the Gemm and the Min: on 2 cores, 3,648
    entries, ONNX Runtime, 8.4 against 10.1 ms for 1,024 patches and 33 against 46 ms for 4,096 in one block
    (benchmarks/bank_search.py).
    `neighbours` holds, for each bank entry, the indices of its nearest entries in the bank (itself first),
    computed at training time.
    """

    def __init__(self, bank: torch.Tensor, neighbours: torch.Tensor):
        super().__init__()
        self.register_buffer("bank", bank.float().contiguous())
        self.register_buffer("neighbours", neighbours.long().contiguous())
        # patches per block: the power of two whose distances to the bank fill about 2 MB (128 for 3,648 entries)
        self.block_rows = 1 << max(0, ((1 << 19) // len(bank)).bit_length() - 1)

    def search_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """−2·Mᵀ and ‖m‖², computed from the bank once per call: in the exported graph each folds into one
        constant that every block's Gemm shares (a buffer would be copied into each of them)."""
        return -2 * self.bank.T, (self.bank**2).sum(1)

    @staticmethod
    def partial_squared(queries: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """queries (N, C) → ‖m‖² − 2·q·m for every bank entry (N, M): the squared distance less ‖q‖²."""
        minus_twice_bank_t, bank_sq_norm = terms
        return torch.addmm(bank_sq_norm, queries, minus_twice_bank_t)

    def distances(self, queries: torch.Tensor, terms: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """queries (B, P, C) → distance of each to its nearest bank entry (B, P)."""
        terms = terms or self.search_terms()
        patches, channels, rows = int(queries.shape[1]), int(queries.shape[2]), self.block_rows
        nearest = []
        for start in range(0, patches, rows):  # sliced with constant bounds, so the graph needs no shape arithmetic
            block = queries[:, start:start + rows].reshape(-1, channels)
            nearest.append(torch.amin(self.partial_squared(block, terms), dim=1).view(-1, min(rows, patches - start)))
        return (torch.cat(nearest, dim=1) + (queries**2).sum(-1)).clamp_min(0).sqrt()

    def image_score(self, queries: torch.Tensor, distances: torch.Tensor,
                    terms: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """s = (1 − softmax over the neighbourhood of m* of ‖q* − m‖, taken at m*) · s*, for the worst patch q*
        and its nearest bank entry m* (searched again for that one patch rather than kept for all of them)."""
        score, worst = distances.max(dim=1)
        worst_query = queries.gather(1, worst.view(-1, 1, 1).expand(-1, 1, queries.shape[-1]))[:, 0]
        worst_nearest = self.partial_squared(worst_query, terms or self.search_terms()).argmin(dim=1)
        support = self.bank[self.neighbours[worst_nearest]]
        support_distances = ((support - worst_query[:, None]) ** 2).sum(-1).clamp_min(0).sqrt()
        weight = 1 - torch.softmax(support_distances, dim=1)[:, 0]
        return weight * score


class PatchCore(nn.Module):
    """uint8 RGB images (B, H, W, 3) → anomaly_map (B, 1, H, W) and score (B,)."""

    half_precision_modules = ("embedding.extractor",)  # fp16-tolerant; the rest stays fp32

    def __init__(self, extractor: FeatureExtractor, normalization: Normalization, projection: FeatureProjection,
                 memory: MemoryBank, sigma: float, image_score: str = "map-max", patch_stride: int = 0):
        super().__init__()
        self.image_input = ImageInput(normalization)
        self.embedding = PatchEmbedding(extractor, patch_stride)
        self.projection = projection
        self.memory = memory
        self.to_image = MapToImage(sigma)
        self.image_score = image_score

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.image_input(images))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(images)
        batch, _, height, width = embedding.shape
        queries = self.projection(embedding.flatten(2).transpose(1, 2))
        terms = self.memory.search_terms()
        distances = self.memory.distances(queries, terms)
        anomaly_map = self.to_image(distances.view(batch, 1, height, width), images.shape[1:3])
        if self.image_score == "reweighted":
            return anomaly_map, self.memory.image_score(queries, distances, terms)
        return anomaly_map, anomaly_map.amax(dim=(1, 2, 3))


def random_projection(features: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """Gaussian random projection to `dim` dimensions in bfloat16: distances are kept well enough to pick a
    coreset, at a fraction of the memory traffic."""
    if features.shape[1] <= dim:
        return features.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same matrix whatever the features' device
    matrix = torch.randn(features.shape[1], dim, generator=generator).to(features.device) / dim**0.5
    return (features @ matrix).to(torch.bfloat16)


def greedy_coreset(points: torch.Tensor, size: int, seed: int, progress=None,
                   min_distance: torch.Tensor | None = None) -> torch.Tensor:
    """Greedy k-center selection: repeatedly take the point farthest from everything chosen so far.

    All buffers are allocated once, on the points' device; each iteration is one matrix-vector product over
    the points. The chosen index stays a tensor on that device, so a GPU never waits for the host. The first
    point is drawn on the CPU, so every device starts from the same one; given `min_distance` (each point's
    squared distance to centres chosen before), the selection continues from those instead. `progress(n)` is
    called every few hundred iterations.
    """
    count, device = points.shape[0], points.device
    size = min(size, count)
    sq_norm = (points.float() ** 2).sum(1)
    if min_distance is None:
        min_distance = torch.full((count,), float("inf"), device=device)
        index = torch.randint(count, (1,), generator=torch.Generator().manual_seed(seed)).to(device)
    else:
        min_distance = min_distance.clone()
        index = torch.argmax(min_distance, dim=0, keepdim=True)
    dots = torch.empty(count, dtype=points.dtype, device=device)
    distance = torch.empty(count, device=device)
    chosen = torch.empty(size, dtype=torch.long, device=device)
    for step in range(size):
        chosen[step:step + 1] = index
        torch.mv(points, points[index][0], out=dots)
        distance.copy_(dots).mul_(-2).add_(sq_norm).add_(sq_norm[index])
        torch.minimum(min_distance, distance, out=min_distance)
        index = torch.argmax(min_distance, dim=0, keepdim=True)
        if progress is not None and (step + 1) % 256 == 0:
            progress(256)
    return chosen


def squared_distance_to_nearest(points: torch.Tensor, centres: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
    """Each point's squared distance to its nearest centre, in float32 matrix products over chunks of points
    (compute-bound, unlike the greedy loop's matrix-vector products)."""
    centres = centres.float()
    centre_sq = (centres**2).sum(1)
    nearest = []
    for start in range(0, points.shape[0], chunk):
        block = points[start:start + chunk].float()
        squared = torch.addmm(centre_sq, block, centres.T, alpha=-2).amin(1) + (block**2).sum(1)
        nearest.append(squared.clamp_min(0))
    return torch.cat(nearest)


def pooled_greedy_coreset(points: torch.Tensor, size: int, seed: int, pool_factor: int = 32,
                          exact_fraction: float = 0.125, progress=None) -> torch.Tensor:
    """Greedy k-center selection that scales to millions of patches. The exact loop costs patches × size;
    here most centres are chosen greedily within a random pool of `pool_factor` × size patches, then every
    patch's distance to them is computed in one pass of matrix products, and the last `exact_fraction` of the
    centres are chosen by the exact greedy loop over all patches, which takes the patches the pool missed
    (the farthest first). Where the pool would hold every patch this is the exact selection."""
    count = points.shape[0]
    size = min(size, count)
    if pool_factor * size >= count:
        return greedy_coreset(points, size, seed, progress)
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randperm(count, generator=generator)[:pool_factor * size].to(points.device)
    pooled = max(1, size - round(exact_fraction * size))
    chosen = pool[greedy_coreset(points[pool], pooled, seed, progress)]
    if pooled == size:
        return chosen
    min_distance = squared_distance_to_nearest(points, points[chosen])
    rest = greedy_coreset(points, size - pooled, seed, progress, min_distance=min_distance)
    return torch.cat([chosen, rest])


def coverage_radius(points: torch.Tensor, centres: torch.Tensor) -> float:
    """The farthest any point lies from its nearest centre: what a k-center coreset minimises."""
    return float(squared_distance_to_nearest(points, centres.to(points.device)).max().sqrt())


def bank_neighbours(bank: torch.Tensor, k: int, chunk: int = 4096) -> torch.Tensor:
    """Indices (M, k) of each bank entry's k nearest entries in the bank, itself first (on the bank's device)."""
    k = min(k, bank.shape[0])
    sq_norm = (bank**2).sum(1)
    rows = []
    for start in range(0, bank.shape[0], chunk):
        block = bank[start:start + chunk]
        squared = (block**2).sum(1, keepdim=True) - 2 * block @ bank.T + sq_norm
        diagonal = torch.arange(block.shape[0], device=bank.device)
        squared[diagonal, diagonal + start] = -1  # self first
        rows.append(squared.topk(k, dim=1, largest=False).indices)
    return torch.cat(rows)


def build_patchcore(config: PatchCoreConfig, projection: FeatureProjection, memory: MemoryBank,
                    weights=None, pretrained: bool = True) -> PatchCore:
    extractor, backbone_normalization = create_feature_extractor(config.backbone, config.strides, weights, pretrained)
    normalization = input_normalization(config.normalization, backbone_normalization)
    return PatchCore(extractor, normalization, projection, memory, config.sigma, config.image_score,
                     config.patch_stride).eval()


def untrained_patchcore(config: PatchCoreConfig, weights=None, pretrained: bool = True) -> PatchCore:
    """The backbone with an empty projection and bank, as fitting starts from (and a test embeds with)."""
    identity = FeatureProjection(torch.zeros(1), torch.zeros(1, 0))
    return build_patchcore(config, identity, MemoryBank(torch.zeros(1, 1), torch.zeros(1, 1)), weights, pretrained)


def restore_patchcore(config: PatchCoreConfig, state: dict) -> PatchCore:
    if "projection.weight" not in state:  # a run from before the principal components: every channel
        state = {**state, "projection.weight": torch.zeros(1, 0), "projection.bias": torch.zeros(0)}
    projection = FeatureProjection(torch.zeros(state["projection.weight"].shape[0]), state["projection.weight"])
    memory = MemoryBank(state["memory.bank"], state["memory.neighbours"])
    model = build_patchcore(config, projection, memory, pretrained=False)
    model.load_state_dict(state)
    return model


def fit_patchcore(config: PatchCoreConfig, fit_images: np.ndarray, validation_images: np.ndarray, weights,
                  bar: Progress, checkpoint, device: torch.device = CPU) -> tuple[PatchCore, PatchCoreConfig, dict]:
    """Memory bank from the fit images (no gradient training, so the validation images are not needed); the
    features, the coreset and the bank's neighbours are computed on `device`."""
    model = untrained_patchcore(config, weights).to(device)
    if config.feature_dim > model.embedding.dim:  # before the features are computed, not after
        raise InspectError(f"--feature-dim {config.feature_dim} is more than the {model.embedding.dim} channels of "
                           f"{config.backbone} at strides {config.strides}; give at most that, or 0 for all")
    timings = {}
    task = bar.add_task("patch features", total=len(fit_images))
    clock = time.perf_counter()
    patches = extract_patches(model, fit_images, progress=lambda n: bar.advance(task, n), device=device)
    timings["features_s"] = elapsed_s(clock, device)

    clock = time.perf_counter()
    model.projection = fit_projection(patches, config.feature_dim)
    patches = model.projection(patches)
    timings["projection_s"] = elapsed_s(clock, device)

    size = min(config.coreset_max_entries, max(1, round(config.coreset_ratio * len(patches))))
    task = bar.add_task(f"coreset {size} of {len(patches)} patches", total=size)
    clock = time.perf_counter()
    projected = random_projection(patches, config.projection_dim, config.seed)
    chosen = pooled_greedy_coreset(projected, size, config.seed, progress=lambda n: bar.advance(task, n))
    bar.update(task, completed=size)
    timings["coreset_s"] = elapsed_s(clock, device)

    clock = time.perf_counter()
    bank = patches[chosen].contiguous()
    model.memory = MemoryBank(bank, bank_neighbours(bank, config.num_neighbours))
    timings["neighbours_s"] = elapsed_s(clock, device)
    details = {"memory_bank": {"entries": int(bank.shape[0]), "dim": int(bank.shape[1]), "patches": int(len(patches))},
               "timings": {k: round(v, 2) for k, v in timings.items()}}
    return model.cpu(), config, details


def extract_patches(model: PatchCore, images: np.ndarray, batch_size: int = 16, progress=None,
                    device: torch.device = CPU) -> torch.Tensor:
    """Patch features (N·h·w, C) of uint8 images (N, H, W, 3), computed on `device` (the model's)."""
    def patches(batch: torch.Tensor) -> torch.Tensor:
        embedding = model.embed(batch)
        return embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1])
    return map_in_batches(patches, images, batch_size, progress, device)[0]
