#!/usr/bin/env bash
# On a GPU box or Jetson with TensorRT: check the bundle's engine against ONNX Runtime on the CPU and report
# per-frame latency of every backend that opens here. The engine in the bundle is measured as it is; one is
# built only when there is none, when --rebuild is given, or when --fp16/--fp32 asks for another precision.
#
#   benchmarks/gpu_check.sh BUNDLE [--images DIR] [--fp16 | --fp32] [--rebuild]
set -euo pipefail
usage="usage: benchmarks/gpu_check.sh BUNDLE [--images DIR] [--fp16 | --fp32] [--rebuild]"
bundle=${1:?$usage}
shift
images="" precision="" rebuild=0
while [ $# -gt 0 ]; do
    case "$1" in
        --images) images=${2:?$usage}; shift 2 ;;
        --fp16) precision=fp16; shift ;;
        --fp32) precision=fp32; shift ;;
        --rebuild) rebuild=1; shift ;;
        *) echo "$usage" >&2; exit 2 ;;
    esac
done
built=$(python -c "import json,sys; e=json.load(open(sys.argv[1]+'/bundle.json')).get('engine') or {}; \
print(e.get('precision', 'fp16' if e.get('fp16') else 'fp32') if e else '')" "$bundle")
if [ "$rebuild" = 1 ] || [ -z "$built" ] || { [ -n "$precision" ] && [ "$precision" != "$built" ]; }; then
    want=${precision:-${built:-fp32}}
    echo "building a $want engine (in the bundle: ${built:-none})"
    inspect-export "$bundle" --engine $([ "$want" = fp16 ] && echo --fp16)
else
    echo "measuring the $built engine already in the bundle (--rebuild to build it again)"
fi
python - "$bundle" "$images" <<'PY'
import sys

import numpy as np

from edgeinspect.runtime.inference.backends import BACKENDS, open_backend
from edgeinspect.runtime.commands.bench import median_ms
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.images import list_images, load_resized

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
