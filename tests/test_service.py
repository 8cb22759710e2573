"""A line as a service: the systemd unit parses, inspect-run under systemd-like supervision (a notify socket and a
watchdog period, as systemd gives a Type=notify unit) says READY and feeds the watchdog while it runs and while it
waits for frames, a stalled frame loop stops feeding it, and the container recipe's command runs a line config."""

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

from edgeinspect.runtime.capture.grabbers import Grabber, Grabbers
from edgeinspect.runtime.capture.sources import FolderSource
from edgeinspect.runtime.commands.service import ServiceNotifier
from edgeinspect.runtime.frame_loop import FrameLoop, LatencyStats, inspect_until_done
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.images import list_images
from edgeinspect.runtime.inference.inspector import Inspector
from edgeinspect.runtime.outputs.sinks import Sink, Sinks

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "deploy" / "edge-inspect@.service"
RUN = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()"]


class NotifySocket:
    """What systemd listens on for a Type=notify unit: a datagram socket; messages kept with their arrival time."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self):
        while not self.closed.is_set():
            try:
                data = self.socket.recv(4096)
            except (socket.timeout, OSError):
                continue
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, text: str, after: float = 0.0, timeout: float = 60) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, message in list(self.messages):
                if when >= after and text in message.splitlines():
                    return when
            time.sleep(0.02)
        raise AssertionError(f"no {text} after {after} within {timeout} s: {self.messages[-5:]}")

    def count(self, text: str, start: float, end: float) -> int:
        return sum(1 for when, message in list(self.messages) if start <= when < end and text in message.splitlines())

    def close(self):
        self.closed.set()
        self.thread.join()
        self.socket.close()


@pytest.fixture
def notify_socket(tmp_path):
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


def test_the_unit_file_verifies_and_runs_inspect_run_with_a_line_config(tmp_path):
    """systemd-analyze verify passes without a warning, with ExecStart pointing at this machine's inspect-run (verify
    checks that the program exists); the unit is Type=notify with a watchdog and restarts on failure."""
    text = UNIT.read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify" and settings["Restart"] == "on-failure" and int(settings["WatchdogSec"]) > 0
    assert settings["ExecStart"] == "/opt/edge-inspect/venv/bin/inspect-run --config /etc/edge-inspect/%i.toml"
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (Debian package systemd)")
    here = shutil.which("inspect-run") or str(Path(sys.executable).parent / "inspect-run")
    unit = tmp_path / "edge-inspect@line1.service"
    unit.write_text(text.replace("/opt/edge-inspect/venv/bin/inspect-run", here))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    unit.write_text(text.replace("/opt/edge-inspect/venv/bin/inspect-run", here).replace("Restart=", "Restat="))
    assert "Unknown key" in subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True).stderr


def test_the_notifier_speaks_sd_notify_and_feeds_the_watchdog_at_most_every_quarter_period(notify_socket):
    notifier = ServiceNotifier({"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "400000"})
    start = time.monotonic()
    notifier.ready("run 1")
    for _ in range(50):  # 0.5 s of frames every 10 ms: fed every 0.1 s, not 50 times
        notifier.alive()
        time.sleep(0.01)
    notifier.stopping()
    notify_socket.wait_for("STOPPING=1", start)
    assert notify_socket.wait_for("READY=1", start) <= notify_socket.wait_for("WATCHDOG=1", start)
    assert 3 <= notify_socket.count("WATCHDOG=1", start, time.monotonic()) <= 7
    assert "STATUS=run 1" in notify_socket.messages[0][1]
    silent = ServiceNotifier({})  # not under systemd: nothing is sent, nothing fails
    silent.ready("x"), silent.alive(), silent.stopping()


def test_a_stalled_frame_loop_stops_feeding_the_watchdog(patchcore_bundle, mvtec_like, notify_socket):
    """The loop feeds the watchdog while it waits for frames (an idle line is not a stalled one); an output that
    blocks stalls the loop, and the feeding stops until it returns."""
    notifier = ServiceNotifier({"NOTIFY_SOCKET": notify_socket.path, "WATCHDOG_USEC": "200000"})
    release, blocked = threading.Event(), threading.Event()

    class BlockingSink(Sink):
        def handle(self, item):
            blocked.set()
            release.wait(10)

    stop = threading.Event()
    folder = mvtec_like / "test" / "good"
    source = FolderSource(list_images(folder), folder, watch=True)  # keeps waiting for new files
    grabbers = Grabbers([Grabber(source, "every", stop, label="good")])
    loop = FrameLoop(Inspector(load_bundle(patchcore_bundle)), Sinks([BlockingSink()]), LatencyStats(), "run")
    thread = threading.Thread(target=inspect_until_done, args=(grabbers, loop, stop, 1, 0, notifier.alive))
    grabbers.start()
    thread.start()
    try:
        assert blocked.wait(30)
        stalled = time.monotonic()
        time.sleep(1.0)
        assert notify_socket.count("WATCHDOG=1", stalled, time.monotonic()) == 0  # 5 watchdog periods: none
        release.set()  # the output returns: the loop runs through the folder, then waits for new files
        resumed = time.monotonic()
        time.sleep(1.0)
        assert notify_socket.count("WATCHDOG=1", resumed, time.monotonic()) >= 5
    finally:
        release.set()
        stop.set()
        thread.join(10)
        grabbers.join(5)


def line_config(bundle, source, out) -> str:
    return f'bundle = "{bundle}"\nout = "{out}"\n\n[[sources]]\nsource = "{source}"\nname = "line camera"\n\n' \
           '[capture]\nwatch = true\n'


def test_inspect_run_under_supervision_is_ready_feeds_the_watchdog_and_is_restarted_when_stuck(
        patchcore_bundle, mvtec_like, notify_socket, tmp_path):
    """A bundle like the demo's, run from a line config file the way the unit runs it, with $NOTIFY_SOCKET and
    $WATCHDOG_USEC as systemd sets them: READY, then the watchdog fed while frames come and while the folder is
    idle; a process that stops (SIGSTOP, as a hung one) stops feeding it; the supervisor kills and starts it again,
    and the new process is ready and fed; SIGTERM then stops it cleanly with STOPPING and a summary."""
    incoming = tmp_path / "incoming"
    shutil.copytree(mvtec_like / "test" / "pasted", incoming)
    config = tmp_path / "line.toml"
    config.write_text(line_config(patchcore_bundle, incoming, tmp_path / "out"))
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="1000000")
    command = RUN + ["--config", str(config)]

    def start():
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    process = start()
    try:
        ready = notify_socket.wait_for("READY=1")
        time.sleep(2.0)
        assert notify_socket.count("WATCHDOG=1", ready, time.monotonic()) >= 4  # fed at least every 0.5 s
        process.send_signal(signal.SIGSTOP)
        stuck = time.monotonic() + 0.3
        time.sleep(2.0)  # two watchdog periods: systemd would restart the unit now
        assert notify_socket.count("WATCHDOG=1", stuck, time.monotonic()) == 0
        process.kill()
        process.wait(10)
        process = start()
        again = notify_socket.wait_for("READY=1", after=stuck)
        notify_socket.wait_for("WATCHDOG=1", after=again)
        log, deadline = tmp_path / "out" / "inspections.jsonl", time.monotonic() + 60
        while len(log.read_text().splitlines()) < 12 and time.monotonic() < deadline:  # the folder again, 6 frames
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=30)
        assert process.returncode == 0, errors
        notify_socket.wait_for("STOPPING=1", after=again)
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["sources"]["line camera"]["frames"] == 6
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_container_recipes_command_runs_a_line_config(patchcore_bundle, mvtec_like, tmp_path):
    """deploy/Dockerfile's ENTRYPOINT and CMD, run outside a container with its /line folder here."""
    lines = (ROOT / "deploy" / "Dockerfile").read_text().splitlines()
    entrypoint = json.loads(next(line for line in lines if line.startswith("ENTRYPOINT ")).split(" ", 1)[1])
    command = json.loads(next(line for line in lines if line.startswith("CMD ")).split(" ", 1)[1])
    line = tmp_path / "line"
    line.mkdir()
    (line / "line.toml").write_text(f'bundle = "{patchcore_bundle}"\nout = "out"\n\n[[sources]]\n'
                                    f'source = "{mvtec_like / "test" / "pasted"}"\n')
    program = shutil.which(entrypoint[0]) or str(Path(sys.executable).parent / entrypoint[0])
    args = [str(line) + arg[len("/line"):] if arg.startswith("/line/") else arg for arg in command]
    result = subprocess.run([program, *args], capture_output=True, text=True, timeout=300, cwd=line)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((line / "out" / "summary.json").read_text())["frames"] == 6
