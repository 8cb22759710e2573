"""Trust on the line: a camera's password never leaves the process (console, records, summary, file names, the
operator's page, MQTT), sources carry names, and no record is lost quietly."""

import json
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

from typer.testing import CliRunner

from edgeinspect.runtime.commands.run import app as run_app

from test_mqtt import PREFIX, broker, subscriber, wait_until  # noqa: F401 (fixtures)

RUN = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()"]
SECRET = "s3cret-pa55"
runner = CliRunner()


class Console:
    """A subprocess's console lines, read as they come."""

    def __init__(self, process: subprocess.Popen):
        self.lines: list[str] = []
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(process.stdout.readline, "")),
                                       daemon=True)
        self.thread.start()

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            time.sleep(0.05)
        raise AssertionError(f"no console line matching {pattern!r}: {self.lines[-5:]}")


def files_under(*folders) -> list[str]:
    return [str(p) for folder in folders if folder.exists() for p in folder.rglob("*")]


def test_a_camera_password_never_leaves_the_process(patchcore_bundle, mjpeg_server, broker, subscriber, tmp_path):
    """A stream URL with a password, run with every output on: the password is in no console line, record,
    summary, file name, page, statistics or MQTT message; they show the URL with *** in its place."""
    url, _ = mjpeg_server
    with_password = url.replace("http://", f"http://inspector:{SECRET}@")
    shown = url.replace("http://", "http://inspector:***@")
    out, collected = tmp_path / "out", tmp_path / "collected"
    process = subprocess.Popen(
        RUN + [str(patchcore_bundle), "--source", with_password, "--out", str(out), "--save", "all", "--view", "0",
               "--collect-good", str(collected), "--collect", "2", "--collect-every", "0",
               "--mqtt", f"mqtt://127.0.0.1:{broker.port}/{PREFIX}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    console = Console(process)
    try:
        view = console.wait_for(r"live view on (http://\S+)").group(1)
        wait_until(lambda: (out / "inspections.jsonl").is_file() and subscriber.messages, 30, "frames and messages")
        time.sleep(1.0)
        pages = [urllib.request.urlopen(view + path, timeout=10).read().decode() for path in ("/", "/stats.json")]
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        console.thread.join(10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, console.lines[-10:]
    everything = ["".join(console.lines), (out / "inspections.jsonl").read_text(), (out / "summary.json").read_text(),
                  *pages, *files_under(out, collected), *(topic + json.dumps(body) for topic, body, _ in subscriber.messages)]
    assert [text[:200] for text in everything if SECRET in text] == []
    assert json.loads((out / "inspections.jsonl").read_text().splitlines()[0])["source"] == shown
    assert shown in pages[1] and any(shown in json.dumps(body) for _, body, _ in subscriber.messages)
    assert len(list(collected.glob("*.png"))) == 2


def test_sources_are_named_and_the_name_is_what_records_and_files_use(patchcore_bundle, mvtec_like, tmp_path):
    pasted = mvtec_like / "test" / "pasted"
    result = runner.invoke(run_app, [str(patchcore_bundle), "--source", f"infeed={pasted}", "--out", str(tmp_path),
                                     "--save", "all"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "inspections.jsonl").read_text().splitlines()]
    assert {r["source"] for r in records} == {"infeed"} and len(records) == 6
    assert all("_infeed-" in p.name for p in (tmp_path / "overlays").rglob("*.jpg"))
    twice = runner.invoke(run_app, [str(patchcore_bundle), "--source", f"a={pasted}", "--source", f"a={pasted}",
                                    "--out", str(tmp_path / "twice")])
    assert twice.exit_code == 2 and "two sources are named 'a'" in twice.output


def test_two_sources_whose_labels_end_alike_keep_every_overlay(patchcore_bundle, mvtec_like, tmp_path):
    """Two folders whose paths share their last 60 characters: each frame's overlay is its own file (they wrote
    the same names, and one source's overlays replaced the other's)."""
    common = "inspection-station-images-captured-on-the-line/left-camera/good"
    for side in ("north", "south"):
        (tmp_path / side / common).parent.mkdir(parents=True)
        (tmp_path / side / common).symlink_to(mvtec_like / "test" / "pasted")
    result = runner.invoke(run_app, [str(patchcore_bundle), "--source", str(tmp_path / "north" / common),
                                     "--source", str(tmp_path / "south" / common), "--out", str(tmp_path / "out"),
                                     "--save", "all"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out" / "overlays").rglob("*.jpg"))) == 12
