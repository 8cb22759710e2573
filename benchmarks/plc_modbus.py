"""What --modbus costs the line and how soon a PLC can read a verdict: inspect-run on the same video with and
without the Modbus server (and one client polling it), in turns, frames/s from summary.json; and, in the runs
with it, the time from a record's creation (its "time") to the moment the polling client first reads its `seq`
in the holding registers. Rewrites the PLC table of BENCHMARKS.md.

    python benchmarks/plc_modbus.py --bundle runs/bottle/bundle --data ../shared/data/mvtec_ad/bottle
"""

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

from models import update_benchmarks_md

from edgeinspect.runtime.outputs.plc_modbus import BLOCK, SEQ

TABLE = ("<!-- plc table: begin -->", "<!-- plc table: end -->")
RUN = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def poll_seq(port: int, stop: threading.Event, seen: dict) -> None:
    """A PLC polling the first source's seq register every 5 ms; when each value was first read."""
    client = ModbusTcpClient("127.0.0.1", port=port)
    while not client.connect():
        if stop.is_set():
            return
        time.sleep(0.05)
    last = None
    while not stop.is_set():
        try:
            response = client.read_holding_registers(BLOCK + SEQ, count=1, device_id=1)
        except ModbusException:  # the run ended and closed the connection
            break
        if not response.isError():
            value = response.registers[0]
            if value != last:
                seen.setdefault(value, time.time())
                last = value
        time.sleep(0.005)  # a PLC's scan cycle
    client.close()


def one_run(bundle: Path, video: Path, frames: int, modbus: bool, work: Path) -> tuple[float, list[float]]:
    out = work / f"out-{time.monotonic_ns()}"
    port = free_port()
    command = RUN + [str(bundle), "--source", str(video), "--loop", "--mode", "every", "--max-frames", str(frames),
                     "--save", "none", "--out", str(out)] + (["--modbus", f"127.0.0.1:{port}"] if modbus else [])
    stop, seen = threading.Event(), {}
    poller = threading.Thread(target=poll_seq, args=(port, stop, seen), daemon=True)
    if modbus:
        poller.start()
    subprocess.run(command, check=True, capture_output=True)
    stop.set()
    if modbus:
        poller.join(timeout=10)
    fps = json.loads((out / "summary.json").read_text())["fps"]
    latencies = []
    for line in (out / "inspections.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "seq" in record and record["seq"] % 65536 in seen:
            made = datetime.fromisoformat(record["time"]).timestamp()
            latencies.append(1000 * (seen[record["seq"] % 65536] - made))
    return fps, latencies


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a calibrated bundle")
    parser.add_argument("--data", type=Path, required=True, help="an MVTec AD category: its test images make the video")
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        video = work / "line.avi"
        height, width = json.loads((args.bundle / "bundle.json").read_text())["input"]["size"]
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (width, height))
        for path in sorted((args.data / "test").glob("*/*.png")):
            writer.write(cv2.resize(cv2.imread(str(path)), (width, height), interpolation=cv2.INTER_AREA))
        writer.release()
        fps = {False: [], True: []}
        latencies = []
        for _ in range(args.runs):
            for modbus in (False, True):
                rate, seen = one_run(args.bundle, video, args.frames, modbus, work)
                fps[modbus].append(rate)
                latencies += seen
                print(f"modbus={modbus}: {rate:.1f} frames/s", flush=True)
    without, with_ = statistics.median(fps[False]), statistics.median(fps[True])
    p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"), float("nan"))
    rows = ["| inspect-run | frames/s (median of runs) | runs | verdict → readable by the PLC, p50 / p99 ms |",
            "| --- | --- | --- | --- |",
            f"| without --modbus | {without:.1f} | {', '.join(f'{r:.1f}' for r in fps[False])} | - |",
            f"| with --modbus and a client polling every 5 ms | {with_:.1f} ({with_ / without:.3f}×) | "
            f"{', '.join(f'{r:.1f}' for r in fps[True])} | {p50:.1f} / {p99:.1f} ({len(latencies)} frames) |"]
    update_benchmarks_md(args.markdown, *TABLE, f"Generated {time.strftime('%Y-%m-%d')} by `python "
                         f"benchmarks/plc_modbus.py --bundle {args.bundle} --data {args.data}` on "
                         f"{platform.machine()}, {os.cpu_count()} cores; {args.frames} frames per run, in turns.",
                         "\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
