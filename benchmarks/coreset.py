"""The pooled greedy coreset against the exact greedy loop on the same real patches: seconds and coverage
radius (the farthest any patch lies from its nearest bank entry, in the space the selection works in and in the
bank's feature space: the same space at the defaults, whose 64 principal components need no random projection),
at each input size given.

    python benchmarks/coreset.py --data ../shared/data/mvtec_ad/bottle --size 256 --size 512
"""

import argparse
import json
import os
import time

import torch

from edgeinspect.runtime.datasets import open_dataset, split_fit_validation
from edgeinspect.runtime.inference.images import load_resized
from edgeinspect.train.patchcore import (PatchCoreConfig, coverage_radius, extract_patches, fit_projection,
                                         greedy_coreset, pooled_greedy_coreset, random_projection,
                                         untrained_patchcore)


def compare(data: str, size: int) -> dict:
    config = PatchCoreConfig(image_size=(size, size))
    fit, _ = split_fit_validation(open_dataset(data).good, 0.2, config.seed)
    images, _ = load_resized(fit, config.image_size)
    model = untrained_patchcore(config)
    with torch.inference_mode():
        patches = extract_patches(model, images)
        patches = fit_projection(patches, config.feature_dim)(patches)  # as training does
        projected = random_projection(patches, config.projection_dim, config.seed)
        entries = min(config.coreset_max_entries, round(config.coreset_ratio * len(patches)))
        result = {"data": data, "size": size, "patches": len(patches), "entries": entries}
        for name, select in (("pooled", pooled_greedy_coreset), ("exact", greedy_coreset)):
            clock = time.perf_counter()
            chosen = select(projected, entries, config.seed)
            result[name] = {"seconds": round(time.perf_counter() - clock, 1),
                            "radius_projected": round(coverage_radius(projected, projected[chosen]), 3),
                            "radius_features": round(coverage_radius(patches, patches[chosen]), 3)}
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--size", type=int, action="append", required=True)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    for size in args.size:
        print(json.dumps(compare(args.data, size)), flush=True)


if __name__ == "__main__":
    main()
