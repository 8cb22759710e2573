"""Trust on the line: a camera's password never leaves the process (console, records, summary, file names, the
operator's page, MQTT), sources carry names, and no record is lost quietly."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from typer.testing import CliRunner

from edgeinspect.runtime.commands.run import app as run_app

from test_line_box import tmpfs
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


# -- no record lost quietly --------------------------------------------------------------------------------------

def watched(folder):
    """A watching FolderSource in a thread: (frames seen so far as (name, mean grey), stop)."""
    from edgeinspect.runtime.capture.sources import FolderSource

    stop, seen = threading.Event(), []
    source = FolderSource([], folder, watch=True, poll_s=0.05, settle_s=0.1)
    thread = threading.Thread(target=lambda: seen.extend((name, round(float(rgb.mean()))) if rgb is not None
                                                          else (name, error) for name, rgb, error in
                                                          source.frames(stop)), daemon=True)
    thread.start()
    return seen, stop, thread


def test_watch_takes_a_file_renamed_over_another_and_one_rewritten_in_place(tmp_path):
    import cv2
    import numpy as np

    folder = tmp_path / "incoming"
    folder.mkdir()
    seen, stop, thread = watched(folder)
    try:
        cv2.imwrite(str(folder / "part.png"), np.full((32, 32, 3), 10, np.uint8))
        wait_until(lambda: len(seen) == 1, 10, "the first file")
        cv2.imwrite(str(tmp_path / "part.png"), np.full((32, 32, 3), 20, np.uint8))
        os.replace(tmp_path / "part.png", folder / "part.png")  # the README's advice: write elsewhere, rename in
        wait_until(lambda: len(seen) == 2, 10, "the file renamed over it")
        time.sleep(0.3)
        cv2.imwrite(str(folder / "part.png"), np.full((32, 32, 3), 30, np.uint8))  # rewritten in place
        wait_until(lambda: len(seen) == 3, 10, "the file rewritten in place")
        time.sleep(0.5)
        assert seen == [("part.png", 10), ("part.png", 20), ("part.png", 30)]  # each content once
    finally:
        stop.set()
        thread.join(5)


def test_a_watched_folder_that_goes_away_is_waited_for(tmp_path, capfd):
    import cv2
    import numpy as np

    folder = tmp_path / "incoming"
    folder.mkdir()
    seen, stop, thread = watched(folder)
    try:
        shutil.rmtree(folder)
        time.sleep(0.3)
        folder.mkdir()
        cv2.imwrite(str(folder / "after.png"), np.full((32, 32, 3), 40, np.uint8))
        wait_until(lambda: seen == [("after.png", 40)], 10, "a file in the folder that came back")
    finally:
        stop.set()
        thread.join(5)
    errors = capfd.readouterr().err
    assert "the watched folder is gone" in errors and "Traceback" not in errors


def test_an_unusable_mqtt_queue_stops_the_run_before_it_starts(patchcore_bundle, mvtec_like, tmp_path):
    import sqlite3

    good = str(mvtec_like / "test" / "good")
    readonly, disk = tmp_path / "readonly", tmp_path / "read-only-disk"
    readonly.mkdir()
    tmpfs(disk, "1M")  # read-only for root too (a file's mode is not)
    try:
        database = sqlite3.connect(disk / "mqtt-queue.sqlite")
        database.execute("CREATE TABLE queue (id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, "
                         "payload TEXT NOT NULL)")
        database.close()
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        (readonly / "mqtt-queue.sqlite").symlink_to(disk / "mqtt-queue.sqlite")
        check_queue_refused(patchcore_bundle, good, readonly, "cannot use")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)
    other = tmp_path / "other"
    other.mkdir()
    database = sqlite3.connect(other / "mqtt-queue.sqlite")
    database.execute("CREATE TABLE queue (message BLOB)")
    database.close()
    check_queue_refused(patchcore_bundle, good, other, "of another layout")


def check_queue_refused(bundle, source: str, out, message: str) -> None:
    result = runner.invoke(run_app, [str(bundle), "--source", source, "--out", str(out),
                                     "--mqtt", "mqtt://127.0.0.1:1/plant/line1"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (out / "inspections.jsonl").exists()


@pytest.mark.parametrize("url, message", [
    ("mqtt://broker/$SYS/line1", "topics beginning with $"),
    ("mqtt://[broker/line1", "not a URL"),
    ("mqtt://broker/" + "x" * 70000, "at most"),
])
def test_mqtt_topics_the_broker_would_drop_are_refused(patchcore_bundle, mvtec_like, tmp_path, url, message):
    result = runner.invoke(run_app, [str(patchcore_bundle), "--source", str(mvtec_like / "test" / "good"),
                                     "--out", str(tmp_path), "--mqtt", url])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_a_topic_prefix_that_is_not_utf8_is_one_line(patchcore_bundle, mvtec_like, tmp_path):
    command = [arg.encode() for arg in RUN] + [str(patchcore_bundle).encode(), b"--source",
                                               str(mvtec_like / "test" / "good").encode(), b"--out",
                                               str(tmp_path).encode(), b"--mqtt", b"mqtt://broker/line\xff"]
    result = subprocess.run(command, capture_output=True)
    assert result.returncode == 2 and b"not valid UTF-8" in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM),
                                     (signal.SIGINT,)])
def test_stopping_is_bounded_and_always_writes_the_summary(patchcore_bundle, mvtec_like, tmp_path, signals):
    """The broker unreachable, so the stop waits on MQTT's drain: a second signal meanwhile, or one alone, still
    ends with summary.json, within 8 s."""
    process = subprocess.Popen(RUN + [str(patchcore_bundle), "--source", str(mvtec_like / "test" / "good"),
                                      "--watch", "--out", str(tmp_path), "--mqtt", "mqtt://127.0.0.1:1/plant/line1"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: (tmp_path / "inspections.jsonl").is_file(), 60, "the first frames")
        time.sleep(1.0)
        started = time.monotonic()
        for sig in signals:
            process.send_signal(sig)
            time.sleep(0.5)
        output, _ = process.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0 and "Traceback" not in output, output
    assert json.loads((tmp_path / "summary.json").read_text())["frames"] == 6 and took < 8, took


def test_a_bundle_whose_graph_disagrees_with_bundle_json_is_one_line(patchcore_bundle, tmp_path):
    """bundle.json edited to another input size, or the model swapped with its digest for a graph of other
    outputs: a one-line error naming the model file, before any backend runs it."""
    import onnx

    from edgeinspect.runtime.files import sha256_file

    edited = tmp_path / "edited"
    shutil.copytree(patchcore_bundle, edited)
    record = json.loads((edited / "bundle.json").read_text())
    record["input"]["size"] = [96, 96]
    (edited / "bundle.json").write_text(json.dumps(record))
    swapped = tmp_path / "swapped"
    shutil.copytree(patchcore_bundle, swapped)
    model = onnx.load(str(swapped / "model.onnx"))
    model.graph.output[1].name = "image_score"
    for node in model.graph.node:
        node.output[:] = ["image_score" if name == "score" else name for name in node.output]
    onnx.save(model, str(swapped / "model.onnx"))
    record = json.loads((swapped / "bundle.json").read_text())
    record["files"]["model.onnx"] = {"sha256": sha256_file(swapped / "model.onnx"),
                                     "bytes": (swapped / "model.onnx").stat().st_size}
    (swapped / "bundle.json").write_text(json.dumps(record))
    for bundle, message in ((edited, "the graph takes"), (swapped, "the graph gives")):
        result = runner.invoke(run_app, [str(bundle), "--source", str(tmp_path), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output and "model.onnx" in result.output, result.output
