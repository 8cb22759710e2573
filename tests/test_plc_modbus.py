"""Modbus TCP for the line's PLC: a real pymodbus client against a real inspect-run on real images: the counters,
the NG coil latched until acknowledged (or pulsed), clients that misbehave, and bad addresses as one-line errors."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from edgeinspect.runtime.commands.run import app as run_app
from edgeinspect.runtime.outputs.plc_modbus import (
    BLOCK,
    FRAMES,
    NG_FRAMES,
    SEQ,
    VERDICT,
)
from pymodbus.client import ModbusTcpClient
from typer.testing import CliRunner

RUN = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_run(process: subprocess.Popen) -> str:
    """SIGTERM (inspect-run stops cleanly), its output; killed if it does not end."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def start_run(bundle: Path, folder: Path, out: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(RUN + [str(bundle), "--source", str(folder), "--watch", "--out", str(out), "--save",
                                   "none", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def feed(images: list[Path], folder: Path, count: int, scratch: Path) -> None:
    """`count` files cycling through `images` moved into the watched folder at once, old enough to be taken."""
    scratch.mkdir()
    old = time.time() - 5
    for index in range(count):
        copy = scratch / f"{scratch.name}-{index:04d}.png"
        shutil.copy(images[index % len(images)], copy)
        os.utime(copy, (old, old))
    for copy in sorted(scratch.iterdir()):
        copy.rename(folder / copy.name)


def logged_frames(out: Path) -> int:
    """Frames in the run's log so far (its alarm lines have no seq)."""
    log = out / "inspections.jsonl"
    return sum('"seq"' in line for line in log.read_text().splitlines()) if log.exists() else 0


def connect(port: int, timeout_s: float = 60) -> ModbusTcpClient:
    client = ModbusTcpClient("127.0.0.1", port=port)
    deadline = time.monotonic() + timeout_s
    while not client.connect():
        assert time.monotonic() < deadline, "the Modbus server did not come up"
        time.sleep(0.2)
    return client


def settled_copies(images: list[Path], folder: Path, count: int) -> Path:
    """`count` files cycling through `images`, old enough for --watch to take them at once."""
    folder.mkdir()
    for index in range(count):
        shutil.copy(images[index % len(images)], folder / f"{index:04d}.png")
    old = time.time() - 5
    for path in folder.iterdir():
        os.utime(path, (old, old))
    return folder


def misbehaving_clients(port: int, stop: threading.Event) -> list[threading.Thread]:
    """One client sends garbage, another floods read requests and never reads the answers."""
    def garbage():
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                    sock.sendall(os.urandom(300))
            except OSError:
                pass
            time.sleep(0.05)

    def flood():
        request = bytes.fromhex("000100000006010300000010")  # read 16 holding registers, unit 1
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.settimeout(0.5)
                while not stop.is_set():
                    sock.sendall(request * 50)
        except OSError:  # the server closed it, or its buffer is full: either way the line goes on
            pass

    threads = [threading.Thread(target=target, daemon=True) for target in (garbage, flood)]
    for thread in threads:
        thread.start()
    return threads


def test_a_plc_acknowledging_the_ng_coil_over_1000_frames(patchcore_bundle, mvtec_like, tmp_path):
    """1,000 frames (half NG) through inspect-run --modbus (latched) while two clients misbehave: the PLC polls
    the NG coil and writes 0 to acknowledge each time it finds it set. At the end the registers count every
    frame and every NG the log has (NG frames faster than the PLC polls are one set coil: the NG counter says
    how many), and the run inspected all 1,000."""
    images = [p for pair in zip(sorted((mvtec_like / "test" / "good").iterdir()),
                                sorted((mvtec_like / "test" / "pasted").iterdir())) for p in pair]
    folder = settled_copies(images, tmp_path / "incoming", 1000)
    port, out = free_port(), tmp_path / "out"
    process = subprocess.Popen(RUN + [str(patchcore_bundle), "--source", str(folder), "--watch", "--out", str(out),
                                      "--save", "none", "--modbus", f"127.0.0.1:{port}"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop = threading.Event()
    try:
        plc = connect(port)
        misbehaving = misbehaving_clients(port, stop)
        acknowledged, deadline = 0, time.monotonic() + 180
        while plc.read_holding_registers(BLOCK + FRAMES, count=1, device_id=1).registers[0] < 1000:
            assert time.monotonic() < deadline, "1,000 frames"
            if plc.read_coils(0, count=1, device_id=1).bits[0]:
                plc.write_coil(0, False, device_id=1)
                acknowledged += 1
        time.sleep(0.3)
        registers = plc.read_holding_registers(BLOCK, count=SEQ + 1, device_id=1).registers
        ok_coil = plc.read_coils(1, count=1, device_id=1).bits[0]
        plc.close()
        stop.set()
        for thread in misbehaving:
            thread.join(timeout=5)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    finally:
        stop.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0 and "Traceback" not in output, output
    frames = [json.loads(line) for line in (out / "inspections.jsonl").read_text().splitlines()]
    frames = [line for line in frames if "seq" in line]
    ng = sum(line["verdict"] == "NG" for line in frames)
    assert len(frames) == 1000 and ng >= 400, ng  # the 500 pasted ones at least
    assert registers[FRAMES] == 1000 and registers[NG_FRAMES] == ng and registers[SEQ] == 999
    last = frames[-1]["verdict"]
    assert registers[VERDICT] == {"OK": 1, "NG": 2}[last] and ok_coil == (last == "OK")
    assert acknowledged >= 1


def test_a_pulsed_ng_coil_clears_by_itself(patchcore_bundle, mvtec_like, tmp_path):
    pasted = sorted((mvtec_like / "test" / "pasted").iterdir())[:1]
    folder = settled_copies(pasted, tmp_path / "incoming", 1)
    port = free_port()
    process = subprocess.Popen(RUN + [str(patchcore_bundle), "--source", str(folder), "--watch", "--out",
                                      str(tmp_path / "out"), "--save", "none", "--modbus", f"127.0.0.1:{port}",
                                      "--modbus-ng", "pulse", "--modbus-pulse-ms", "300"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        plc = connect(port)
        deadline = time.monotonic() + 60
        while plc.read_holding_registers(BLOCK + FRAMES, count=1, device_id=1).registers[0] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        set_at = time.monotonic()
        assert plc.read_coils(0, count=1, device_id=1).bits[0]
        while plc.read_coils(0, count=1, device_id=1).bits[0]:
            assert time.monotonic() - set_at < 5, "the pulse did not end"
            time.sleep(0.01)
        assert plc.read_holding_registers(BLOCK + NG_FRAMES, count=1, device_id=1).registers[0] == 1
        plc.close()
    finally:
        output = stop_run(process)
    assert process.returncode == 0, output


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1", "give HOST:PORT"), ("127.0.0.1:0", "port 1 to 65535"), ("127.0.0.1:70000", "port 1 to 65535"),
    ("127.0.0.1:50x", "give HOST:PORT"), ("192.0.2.1:5020", "cannot listen there"),
])
def test_bad_modbus_addresses_are_one_line_errors(patchcore_bundle, mvtec_like, tmp_path, address, message):
    result = CliRunner().invoke(run_app, [str(patchcore_bundle), "--source", str(mvtec_like / "test" / "good"),
                                          "--out", str(tmp_path), "--modbus", address])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert result.output.count("\n") == 1


@pytest.mark.parametrize("option, address", [("--modbus", "127.0.0.1:{port}"),
                                             ("--opcua", "opc.tcp://127.0.0.1:{port}")])
def test_an_address_in_use_is_a_one_line_error(patchcore_bundle, mvtec_like, tmp_path, option, address):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(run_app, [str(patchcore_bundle), "--source", str(mvtec_like / "test" / "good"),
                                              "--out", str(tmp_path), option, address.format(port=port)])
    assert result.exit_code == 2 and "Address already in use" in result.output, result.output


def plc_servers_process(parent: int) -> int:
    """inspect-run's spawned child that runs the PLC servers."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == parent and \
                    b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                return int(stat.parent.name)
        except (OSError, ValueError):
            continue
    raise AssertionError("no PLC servers' process")


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                reason="finds the servers' process through Linux /proc")


@needs_proc
def test_a_frozen_plc_server_process_never_holds_the_line(patchcore_bundle, mvtec_like, tmp_path):
    """The PLC servers' process stopped (SIGSTOP) while 1,000 frames come: inspect-run inspects them all, drops the
    updates that no longer fit the pipe, says so, and after SIGCONT the servers take updates again."""
    images = sorted((mvtec_like / "test" / "good").iterdir())
    folder, out, port = tmp_path / "incoming", tmp_path / "out", free_port()
    folder.mkdir()
    process = start_run(patchcore_bundle, folder, out, "--modbus", f"127.0.0.1:{port}")
    try:
        plc = connect(port)
        servers = plc_servers_process(process.pid)
        os.kill(servers, signal.SIGSTOP)
        feed(images, folder, 1000, tmp_path / "frozen")
        deadline = time.monotonic() + 180
        while logged_frames(out) < 1000:
            assert time.monotonic() < deadline, "the line stopped with the PLC servers"
            time.sleep(0.2)
        os.kill(servers, signal.SIGCONT)
        feed(images, folder, 1, tmp_path / "after")
        while plc.read_holding_registers(BLOCK + SEQ, count=1, device_id=1).registers[0] != 1000:
            assert time.monotonic() < deadline, "the servers took no update after SIGCONT"
            time.sleep(0.05)
        plc.close()
    finally:
        output = stop_run(process)
    assert process.returncode == 0 and "Traceback" not in output, output
    assert "the PLC servers fall behind" in output and "updates dropped" in output, output


@needs_proc
def test_a_plc_server_process_that_dies_raises_an_alarm(patchcore_bundle, mvtec_like, tmp_path):
    """The PLC servers' process killed (SIGKILL) while the run goes on: the `plc` health alarm is raised (in the
    log, with the addresses the PLC no longer gets verdicts over) and the run keeps inspecting."""
    folder, out, port = tmp_path / "incoming", tmp_path / "out", free_port()
    folder.mkdir()
    process = start_run(patchcore_bundle, folder, out, "--modbus", f"127.0.0.1:{port}")
    try:
        connect(port).close()
        os.kill(plc_servers_process(process.pid), signal.SIGKILL)
        deadline = time.monotonic() + 60
        while not (out / "inspections.jsonl").exists() or '"kind": "plc"' not in (out / "inspections.jsonl").read_text():
            assert time.monotonic() < deadline, "no plc alarm"
            time.sleep(0.2)
        feed(sorted((mvtec_like / "test" / "good").iterdir()), folder, 3, tmp_path / "after")
        while logged_frames(out) < 3:
            assert time.monotonic() < deadline, "the run stopped inspecting"
            time.sleep(0.2)
    finally:
        output = stop_run(process)
    assert process.returncode == 0 and "Traceback" not in output, output
    alarm = next(json.loads(line)["alarm"] for line in (out / "inspections.jsonl").read_text().splitlines()
                 if '"kind": "plc"' in line)
    assert alarm["state"] == "raised" and f"Modbus 127.0.0.1:{port}" in alarm["message"], alarm
