"""What the PLC servers cost the line and how soon a PLC can read a verdict: inspect-run on the same video without
them, and with --modbus and --opcua and one client each (a PLC polling the Modbus `seq` register every
--poll-ms, a PLC subscribed to the OPC UA ResultReady events with a --publishing-ms interval), in turns; frames/s
from summary.json. The clients run in a process of their own at the lowest priority (nice 19): a PLC is another
machine, and on this one they should take only what inspection leaves. Latency: from a record's creation (its
"time") to the moment the Modbus client first reads its `seq`, and to the arrival of its OPC UA event. Rewrites
the PLC table of BENCHMARKS.md.

    python benchmarks/plc.py --bundle runs/bottle/bundle --data ../shared/data/mvtec_ad/bottle
"""

import argparse
import asyncio
import json
import os
import platform
import signal
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
from asyncua import Client
from edgeinspect.runtime.outputs.plc_modbus import BLOCK, SEQ
from edgeinspect.runtime.outputs.plc_opcua import NAMESPACE
from models import update_benchmarks_md
from pymodbus.client import ModbusTcpClient
from pymodbus.exceptions import ModbusException

TABLE = ("<!-- plc table: begin -->", "<!-- plc table: end -->")
RUN = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def poll_modbus(port: int, stop: threading.Event, seen: dict, poll_ms: float) -> None:
    """A PLC polling the first source's seq register every `poll_ms`; when each value was first read."""
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
        time.sleep(poll_ms / 1000)  # a PLC's scan cycle
    client.close()


def plc_fields(ns: int):
    """An event filter selecting what a PLC acts on: FrameIndex, ResultEvaluation, Score."""
    from asyncua import ua

    event_filter = ua.EventFilter()
    for name in ("FrameIndex", "ResultEvaluation", "Score"):
        operand = ua.SimpleAttributeOperand()
        operand.TypeDefinitionId = ua.NodeId(ua.ObjectIds.BaseEventType)
        operand.BrowsePath = [ua.QualifiedName(name, ns)]
        operand.AttributeId = ua.AttributeIds.Value
        event_filter.SelectClauses.append(operand)
    return event_filter


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def read_cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
        except (OSError, ValueError):
            pass
    return found


def sample_cpu(pids: dict, stop: threading.Event, samples: list) -> None:
    """(time, {name: CPU seconds}) every 0.25 s for the processes `pids()` names."""
    while not stop.wait(0.25):
        now = {name: cpu_seconds(pid) for name, pid in pids().items()}
        samples.append((time.time(), {name: value for name, value in now.items() if value is not None}))


def cpu_share(samples: list, name: str, start: float, end: float) -> float | None:
    """The share of one core `name` used between `start` and `end` (the steady part of the run)."""
    inside = [(when, values[name]) for when, values in samples if start <= when <= end and name in values]
    if len(inside) < 2:
        return None
    return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])


def subscribe_opcua(port: int, stop: threading.Event, seen: dict, publishing_ms: float) -> None:
    """A PLC subscribed to the ResultReady events; when each seq's event arrived."""
    class Arrivals:
        def event_notification(self, event):
            seen.setdefault(event.FrameIndex, time.time())

    async def subscribed():
        client = Client(f"opc.tcp://127.0.0.1:{port}")
        while not stop.is_set():
            try:
                await client.connect()
                break
            except (OSError, asyncio.TimeoutError):
                await asyncio.sleep(0.05)
        else:
            return
        try:
            ns = await client.get_namespace_index(NAMESPACE)
            system = await client.nodes.objects.get_child(f"{ns}:EdgeInspect")
            event_type = await client.nodes.base_event_type.get_child(f"{ns}:ResultReadyEventType")
            subscription = await client.create_subscription(publishing_ms, Arrivals())
            await subscription.subscribe_events(system, event_type, evfilter=plc_fields(ns), queuesize=0)
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await client.disconnect()
        except Exception:  # noqa: BLE001 - the run ended under it
            pass

    asyncio.run(subscribed())


def plc_clients(modbus: int, opcua: int, poll_ms: float, publishing_ms: float, seen_file: Path) -> None:
    """The clients' process: both clients until SIGTERM, then when each seq was seen, as JSON."""
    os.nice(19)
    stop, seen = threading.Event(), {"modbus": {}, "opcua": {}}
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    clients = [threading.Thread(target=poll_modbus, args=(modbus, stop, seen["modbus"], poll_ms)),
               threading.Thread(target=subscribe_opcua, args=(opcua, stop, seen["opcua"], publishing_ms))]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    seen_file.write_text(json.dumps(seen))


def one_run(bundle: Path, video: Path, frames: int, servers: bool, work: Path, poll_ms: float,
            publishing_ms: float) -> tuple[float, dict]:
    out = work / f"out-{time.monotonic_ns()}"
    modbus, opcua = free_port(), free_port()
    command = RUN + [str(bundle), "--source", str(video), "--loop", "--mode", "every", "--max-frames", str(frames),
                     "--save", "none", "--out", str(out)]
    seen_file, clients = work / f"seen-{time.monotonic_ns()}.json", None
    if servers:
        command += ["--modbus", f"127.0.0.1:{modbus}", "--opcua", f"opc.tcp://127.0.0.1:{opcua}"]
        clients = subprocess.Popen([sys.executable, __file__, "--clients", str(modbus), str(opcua), str(poll_ms),
                                    str(publishing_ms), str(seen_file)], stderr=subprocess.DEVNULL)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    servers_pid: list[int] = []

    def watched() -> dict:
        """The PLC servers' process (inspect-run's spawned child) and the clients' process."""
        if not servers_pid:
            servers_pid.extend(pid for pid in children(process.pid) if b"spawn_main" in read_cmdline(pid))
        return ({"servers": servers_pid[0]} if servers_pid else {}) | (
            {"clients": clients.pid} if clients is not None else {})

    stop, samples = threading.Event(), []
    sampler = threading.Thread(target=sample_cpu, args=(watched, stop, samples), daemon=True)
    sampler.start()
    if process.wait() != 0:
        raise SystemExit(f"inspect-run failed: {process.stderr.read().decode()[-2000:]}")
    stop.set()
    sampler.join()
    seen = {"modbus": {}, "opcua": {}}
    if clients is not None:
        clients.send_signal(signal.SIGTERM)
        clients.wait(timeout=30)
        seen = {protocol: {int(key): value for key, value in values.items()}
                for protocol, values in json.loads(seen_file.read_text()).items()}
    fps = json.loads((out / "summary.json").read_text())["fps"]
    latencies = {"modbus": [], "opcua": []}
    times = []
    for line in (out / "inspections.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "seq" not in record:
            continue
        made = datetime.fromisoformat(record["time"]).timestamp()
        times.append(made)
        for protocol, key in (("modbus", record["seq"] % 65536), ("opcua", record["seq"])):
            if key in seen[protocol]:
                latencies[protocol].append(1000 * (seen[protocol][key] - made))
    shares = {name: cpu_share(samples, name, times[0] + 1.0, times[-1]) for name in ("servers", "clients")}
    return fps, latencies, shares


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a calibrated bundle")
    parser.add_argument("--data", type=Path, required=True, help="an MVTec AD category: its test images make the video")
    parser.add_argument("--frames", type=int, default=600)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--poll-ms", type=float, default=10.0, help="the Modbus client's polling period")
    parser.add_argument("--publishing-ms", type=float, default=50.0, help="the OPC UA subscription's interval")
    parser.add_argument("--markdown", type=Path, default=Path("BENCHMARKS.md"))
    if sys.argv[1:2] == ["--clients"]:
        modbus, opcua, poll_ms, publishing_ms, seen_file = sys.argv[2:7]
        plc_clients(int(modbus), int(opcua), float(poll_ms), float(publishing_ms), Path(seen_file))
        return
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
        latencies = {"modbus": [], "opcua": []}
        shares = {"servers": [], "clients": []}
        for _ in range(args.runs):
            for servers in (False, True):
                rate, seen, used = one_run(args.bundle, video, args.frames, servers, work, args.poll_ms,
                                           args.publishing_ms)
                fps[servers].append(rate)
                for protocol, values in seen.items():
                    latencies[protocol] += values
                for name, share in used.items():
                    if share is not None:
                        shares[name].append(share)
                print(f"servers={servers}: {rate:.1f} frames/s, " + ", ".join(
                    f"{protocol} {len(values)} results seen" for protocol, values in seen.items()) + ", CPU " +
                    ", ".join(f"{name} {share:.0%}" for name, share in used.items() if share is not None),
                    flush=True)
    without, with_ = statistics.median(fps[False]), statistics.median(fps[True])

    def percentiles(values: list[float]) -> str:
        if not values:
            return "none seen"
        p50, p99 = np.percentile(values, [50, 99])
        return f"{p50:.1f} / {p99:.1f} ({len(values)} frames)"

    def share(name: str) -> str:
        return f"{statistics.median(shares[name]):.0%}" if shares[name] else "-"

    rows = ["| inspect-run | frames/s (median of runs) | runs | CPU of one core: PLC servers' process / clients' "
            "process | verdict → readable, p50 / p99 ms |",
            "| --- | --- | --- | --- | --- |",
            f"| without --modbus and --opcua | {without:.1f} | {', '.join(f'{r:.1f}' for r in fps[False])} | - | - |",
            f"| with --modbus and --opcua, one client each | {with_:.1f} ({with_ / without:.3f}×) | "
            f"{', '.join(f'{r:.1f}' for r in fps[True])} | {share('servers')} / {share('clients')} | Modbus, polled "
            f"every {args.poll_ms:g} ms: {percentiles(latencies['modbus'])}; OPC UA, subscribed "
            f"({args.publishing_ms:g} ms publishing): {percentiles(latencies['opcua'])} |"]
    update_benchmarks_md(args.markdown, *TABLE, f"Generated {time.strftime('%Y-%m-%d')} by `python "
                         f"benchmarks/plc.py --bundle {args.bundle} --data {args.data} --frames {args.frames} --runs "
                         f"{args.runs} --poll-ms {args.poll_ms:g} --publishing-ms {args.publishing_ms:g}` on "
                         f"{platform.machine()}, {os.cpu_count()} cores; {args.frames} frames per run, in turns.",
                         "\n".join(rows))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
