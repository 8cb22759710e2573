#!/usr/bin/env bash
# The main job on the built-in solar-cell data (PyPI elpv-dataset): train on good mono cells, export,
# calibrate on held-out good cells, evaluate, and inspect the held-out cells.
set -euo pipefail
runs=${1:-runs/elpv}
inspect-train patchcore --data elpv --out "$runs"
inspect-export "$runs"
inspect-calibrate "$runs/bundle"
inspect-eval "$runs/bundle" --data elpv --report "$runs/report"
inspect-run "$runs/bundle" --source elpv --out "$runs/inspections"
echo "verdicts: $runs/inspections/inspections.jsonl; NG overlays: $runs/inspections/overlays/DATE/*.jpg; report: $runs/report/report.html"
