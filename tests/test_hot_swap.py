"""A running inspect-run takes in a new bundle version without stopping: taught while frames stream through it,
refused with an alarm when the new version does not verify, and loaded again on SIGHUP."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgeinspect.calibration.cli import teach_app
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.hot_swap import HotSwap, bundle_fingerprint
from edgeinspect.runtime.inference.inspector import Inspector

from conftest import good_image, write

RUN = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()"]


class Loop:
    """What HotSwap needs of the frame loop."""

    def __init__(self, inspector):
        self.inspector, self.seq = inspector, 0


@pytest.fixture
def line(patchcore_bundle, tmp_path) -> Path:
    shutil.copytree(patchcore_bundle, tmp_path / "line" / "bundle")
    return tmp_path / "line" / "bundle"


@pytest.fixture
def lamp_frames(tmp_path) -> Path:
    """Good parts under a new lamp (35% brighter), which the bundle flags: 8 frames to teach."""
    rng = np.random.default_rng(7)
    for index in range(8):
        write(tmp_path / "lamp" / f"{index:03d}.png", np.clip(good_image(rng) * 1.35, 0, 255).astype(np.uint8))
    return tmp_path / "lamp"


def test_a_new_version_is_warmed_and_taken_and_a_broken_one_refused(line, lamp_frames):
    loop = Loop(Inspector(load_bundle(line)))
    alarms = []
    swap = HotSwap(loop, line, Inspector, alarms.append)
    before = bundle_fingerprint(line)
    assert CliRunner().invoke(teach_app, [str(line), "--good", str(lamp_frames)]).exit_code == 0
    assert bundle_fingerprint(line) != before
    assert swap.swap() and loop.inspector.version == 2 and alarms == [None]
    record = json.loads((line / "bundle.json").read_text())
    record["files"]["model.onnx"]["sha256"] = "0" * 64  # a copy that went wrong
    (line / "bundle.json").write_text(json.dumps(record))
    running = loop.inspector
    assert not swap.swap()
    assert loop.inspector is running
    assert "was not taken" in alarms[-1] and "sha256 does not match" in alarms[-1]
    assert "version 2 keeps inspecting" in alarms[-1]


def looping_video(path: Path, frames: list[Path]) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (96, 96))
    for frame in frames:
        writer.write(cv2.imread(str(frame)))
    writer.release()
    return path


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def records(out: Path) -> list[dict]:
    path = out / "inspections.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines[:-1]]  # the last line may be half written


def test_teaching_a_running_line_swaps_versions_without_losing_or_repeating_a_frame(line, lamp_frames, mvtec_like,
                                                                                    tmp_path):
    """inspect-run on a video played in a loop (--mode every), taught meanwhile: records switch from version 1 to
    version 2 once, `seq` has no gap and no repeat, a broken copy raises the bundle alarm while version 2 goes on,
    and SIGHUP loads the mended bundle again and clears it."""
    video = looping_video(tmp_path / "line.avi", sorted((mvtec_like / "test" / "good").iterdir()))
    out = tmp_path / "out"
    process = subprocess.Popen(RUN + [str(line), "--source", str(video), "--loop", "--mode", "every", "--out",
                                      str(out), "--save", "none"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        wait_for(lambda: len(records(out)) > 50, 60, "the first frames")
        assert CliRunner().invoke(teach_app, [str(line), "--good", str(lamp_frames)]).exit_code == 0
        wait_for(lambda: any(r.get("version") == 2 for r in records(out)), 60, "version 2 in the records")
        good_record = (line / "bundle.json").read_text()
        broken = json.loads(good_record)
        broken["files"]["model.onnx"]["sha256"] = "0" * 64
        (line / "bundle.json").write_text(json.dumps(broken))
        wait_for(lambda: any(r.get("alarm", {}).get("kind") == "bundle" for r in records(out)), 30, "the alarm")
        (line / "bundle.json").write_text(good_record)
        process.send_signal(signal.SIGHUP)
        seen = len(records(out))
        wait_for(lambda: len(records(out)) > seen + 50, 30, "frames after SIGHUP")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, output
    inspected = [r for r in map(json.loads, (out / "inspections.jsonl").read_text().splitlines()) if "seq" in r]
    assert [r["seq"] for r in inspected] == list(range(len(inspected)))
    versions = [r["version"] for r in inspected]
    switch = versions.index(2)
    assert set(versions[:switch]) == {1} and set(versions[switch:]) == {2}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dropped"] == 0 and summary["frames"] == len(inspected)
    alarms = summary["alarms"]
    bundle_alarms = [a for a in alarms if a["kind"] == "bundle"]
    assert bundle_alarms and all(a["cleared_at"] for a in bundle_alarms)
    assert "bundle version 2 in use" in output and "version 2 keeps inspecting" in output


def test_a_version_copied_in_file_by_file_is_taken_once_its_model_arrives(line, lamp_frames, tmp_path):
    """bundle.json arriving before model.onnx (a cp -r or rsync into the folder) is refused at first, and taken
    when the model is there, without bundle.json changing again: refused versions are tried again."""
    taught = tmp_path / "taught" / "bundle"
    shutil.copytree(line, taught)
    assert CliRunner().invoke(teach_app, [str(taught), "--good", str(lamp_frames)]).exit_code == 0
    loop = Loop(Inspector(load_bundle(line)))
    alarms = []
    swap = HotSwap(loop, line, Inspector, alarms.append, poll_s=0.05)
    swap.RETRY_S = 0.3
    swap.start()
    try:
        shutil.copy(taught / "bundle.json", line / "bundle.json")
        deadline = time.monotonic() + 30
        while not alarms:
            assert time.monotonic() < deadline, "the refusal"
            time.sleep(0.05)
        assert "sha256 does not match" in alarms[0] and loop.inspector.version == 1
        shutil.copy(taught / "model.onnx", line / "model.onnx")
        while loop.inspector.version != 2:
            assert time.monotonic() < deadline, "the retry"
            time.sleep(0.05)
        assert alarms[-1] is None
    finally:
        swap.stop()
