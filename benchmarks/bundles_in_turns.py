"""Per-frame time of several bundles on each CPU backend, timed in turns in one run (so a busy or slow machine
slows them alike), repeated; rewrites the bundles-in-turns table of BENCHMARKS.md.

    python benchmarks/bundles_in_turns.py --bundle "ff5aca6=/tmp/old/run/bundle" --bundle "today=runs/bottle/bundle"
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path

from datasets import CPU_BACKENDS, backend_latencies
from models import update_benchmarks_md

TABLE = ("<!-- bundles in turns table: begin -->", "<!-- bundles in turns table: end -->")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", action="append", required=True, metavar="LABEL=FOLDER")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/bundles_in_turns.json"))
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    bundles = {label: Path(folder) for label, folder in (item.split("=", 1) for item in args.bundle)}
    runs = [backend_latencies(bundles, args.threads) for _ in range(args.runs)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs, indent=2))
    head = ["bundle", *[f"{backend} ms/frame (runs)" for backend in CPU_BACKENDS]]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for label in bundles:
        rows.append("| " + " | ".join([label, *[", ".join(f"{run[label][b]:.1f}" for run in runs if b in run[label])
                                                 for b in CPU_BACKENDS]]) + " |")
    command = "python benchmarks/bundles_in_turns.py " + " ".join(f"--bundle '{item}'" for item in args.bundle)
    update_benchmarks_md(args.markdown, *TABLE, f"Generated {time.strftime('%Y-%m-%d')} by `{command}` on "
                         f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, batch 1; each run "
                         "times every bundle and backend in turns (medians).", "\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
