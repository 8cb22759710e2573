#!/usr/bin/env bash
# On a GPU box or Jetson with TensorRT (and pycuda): build the bundle's engine on this device, check it
# against ONNX Runtime on the CPU, and report per-frame latency of every backend that opens here.
#
#   benchmarks/gpu_check.sh BUNDLE [IMAGE_FOLDER] [--fp16]
set -euo pipefail
bundle=${1:?usage: benchmarks/gpu_check.sh BUNDLE [IMAGE_FOLDER] [--fp16]}
images=${2:-}
precision=${3:-}
inspect-export "$bundle" --engine $precision
python - "$bundle" "$images" <<'PY'
import sys

import numpy as np

from edgeinspect.runtime.backends import BACKENDS, open_backend
from edgeinspect.runtime.bench import median_ms
from edgeinspect.runtime.bundle import load_bundle
from edgeinspect.runtime.images import list_images, load_resized

bundle = load_bundle(sys.argv[1])
if sys.argv[2]:
    frames, _ = load_resized(list_images(sys.argv[2])[:16], bundle.input_size)
else:
    frames = np.random.default_rng(0).integers(0, 256, (8, *bundle.input_size, 3), dtype=np.uint8)
reference_maps, reference_scores = open_backend(bundle, "ort-cpu")(frames)
span = float(reference_maps.max() - reference_maps.min()) or 1.0
print(f"engine: {bundle.record.get('engine')}")
print(f"{'backend':14} {'max |Δscore|/range':>20} {'max |Δmap|/range':>18} {'median ms/frame':>16}")
for name in BACKENDS:
    try:
        backend = open_backend(bundle, name)
    except Exception as error:
        print(f"{name:14} unavailable: {error}")
        continue
    maps, scores = backend(frames)
    print(f"{name:14} {np.abs(scores - reference_scores).max() / span:20.2e} "
          f"{np.abs(maps - reference_maps).max() / span:18.2e} {median_ms(lambda: backend(frames[:1]), 50):16.2f}")
PY
