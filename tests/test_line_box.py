"""Months on the line: each finding of the line-box probe reproduced on real files, a real full disk (tmpfs),
real sockets and real processes, and what inspect-run does about it now."""

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

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgeinspect.runtime.commands.run import app as run_app
from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.outputs.live_view import LiveView
from edgeinspect.runtime.outputs.out_folder import OutLock, parse_bytes
from edgeinspect.runtime.outputs.overlays import DiskBudget
from edgeinspect.runtime.outputs.run_log import JsonLog, cut_partial_line
from edgeinspect.runtime.outputs.sinks import Inspected
from edgeinspect.runtime.capture.sources import FolderSource

runner = CliRunner()
RUN = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()"]


def frame_records(lines: list[str]) -> list[dict]:
    """The frames' records of a log (alarm lines, which carry no seq, left out); every line must parse."""
    return [record for record in map(json.loads, lines) if "alarm" not in record]


def read_log(folder: Path) -> list[dict]:
    return frame_records((folder / "inspections.jsonl").read_text().splitlines())


def read_all_logs(folder: Path) -> list[dict]:
    """The rotated logs (oldest first) and the current one."""
    paths = sorted(folder.glob("inspections-*.jsonl")) + [folder / "inspections.jsonl"]
    return frame_records([line for path in paths for line in path.read_text().splitlines()])


def video_of(folder: Path, path: Path, repeat: int = 1) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (96, 96))
    for _ in range(repeat):
        for image in sorted(folder.iterdir()):
            writer.write(cv2.imread(str(image)))
    writer.release()
    return path


def test_an_undecodable_file_is_a_skipped_line_and_the_run_goes_on(patchcore_bundle, mvtec_like, tmp_path):
    folder = tmp_path / "frames"
    shutil.copytree(mvtec_like / "test" / "pasted", folder)
    (folder / "000_broken.png").write_bytes(b"not an image at all")
    result = runner.invoke(run_app, [str(patchcore_bundle), "--source", str(folder), "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    lines = read_log(tmp_path / "o")
    (broken,) = [line for line in lines if line["name"] == "000_broken.png"]
    assert "not a readable image" in broken["skipped"] and "verdict" not in broken
    assert len(lines) == 7 and [line["seq"] for line in lines] == list(range(7))
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["frames"] == 6 and summary["skipped"] == 1


def test_a_run_that_reads_no_frame_fails(patchcore_bundle, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"garbage")
    result = runner.invoke(run_app, [str(patchcore_bundle), "--source", str(folder), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "no frame could be read" in result.output and "1 skipped" in result.output
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["skipped"] == 1


def test_watch_takes_a_file_caught_mid_write_once_it_is_complete(mvtec_like, tmp_path):
    """A PNG written in two halves with a pause: the half file is not taken (nor given up on), the whole is."""
    folder = tmp_path / "incoming"
    folder.mkdir()
    data = (mvtec_like / "test" / "good" / "000.png").read_bytes()
    source = FolderSource([], folder, watch=True, poll_s=0.1, settle_s=0.2)
    stop, got = threading.Event(), []
    thread = threading.Thread(target=lambda: got.extend(source.frames(stop)))
    thread.start()
    with open(folder / "part.png", "wb") as f:
        f.write(data[:len(data) // 2])
        f.flush()
        time.sleep(0.6)  # longer than settle_s: the half file is old enough to be tried, and does not decode
        f.write(data[len(data) // 2:])
    time.sleep(1.0)
    (folder / "part.png").unlink()  # gone files are forgotten
    time.sleep(0.3)
    stop.set()
    thread.join()
    assert [(name, error) for name, _, error in got] == [("part.png", None)]
    assert got[0][1].shape == (96, 96, 3)


def test_a_watched_file_that_never_decodes_is_logged_once(tmp_path):
    folder = tmp_path / "incoming"
    folder.mkdir()
    (folder / "junk.png").write_bytes(b"junk")
    os.utime(folder / "junk.png", (time.time() - 10, time.time() - 10))
    source = FolderSource([], folder, watch=True, poll_s=0.1, settle_s=0.2)
    stop, got = threading.Event(), []
    thread = threading.Thread(target=lambda: got.extend(source.frames(stop)))
    thread.start()
    time.sleep(0.8)
    stop.set()
    thread.join()
    assert len(got) == 1 and got[0][1] is None and "not a readable image" in got[0][2]


def test_the_log_never_keeps_half_a_line(tmp_path):
    (tmp_path / "inspections.jsonl").write_bytes(b'{"seq": 0}\n{"seq": 1, "sco')  # a crash mid-write
    assert cut_partial_line(tmp_path / "inspections.jsonl") == len(b'{"seq": 1, "sco')
    log = JsonLog(tmp_path)
    log.handle(Inspected({"seq": 2, "score": float("nan"), "threshold": float("inf")}))
    log.close()
    lines = read_log(tmp_path)
    assert lines == [{"seq": 0}, {"seq": 2, "score": None, "threshold": None}]  # strict JSON: no NaN


def test_the_log_rotates_into_whole_gzipped_lines(tmp_path):
    import gzip

    rotated = []
    log = JsonLog(tmp_path, rotate_bytes=2000, compress=True, on_rotated=rotated.append)
    for seq in range(200):
        log.handle(Inspected({"seq": seq, "padding": "x" * 40}))
    log.close()
    assert len(rotated) >= 4 and all(path.suffix == ".gz" for path in rotated)
    lines = [json.loads(line) for path in sorted(rotated) for line in gzip.open(path).read().splitlines()]
    lines += read_log(tmp_path)
    assert [line["seq"] for line in lines] == list(range(200))
    assert all(path.with_suffix("").suffix == ".jsonl" for path in rotated)


def tmpfs(path: Path, size: str):
    path.mkdir(parents=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to fill a disk for real ({result.stderr.decode().strip()})")


def test_a_full_disk_does_not_stop_the_run_and_no_line_is_lost(patchcore_bundle, mvtec_like, tmp_path):
    out = tmp_path / "small-disk"
    tmpfs(out, "8M")  # room for what the run writes, at hundreds of frames/s, once the ballast is gone
    video = video_of(mvtec_like / "test" / "good", tmp_path / "line.avi")
    process = subprocess.Popen(RUN + [str(patchcore_bundle), "--source", str(video), "--loop", "--save", "none",
                                      "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=dict(os.environ, COLUMNS="250"))
    try:
        log = out / "inspections.jsonl"
        deadline = time.time() + 60
        while time.time() < deadline and (not log.is_file() or log.stat().st_size < 2000):
            time.sleep(0.1)
        ballast = os.open(out / "ballast", os.O_WRONLY | os.O_CREAT)
        try:  # fill the disk to the last byte
            while os.write(ballast, b"\0" * 4096):
                pass
        except OSError:
            pass
        os.close(ballast)
        time.sleep(2.0)  # frames keep coming while the disk is full
        full_size = log.stat().st_size
        (out / "ballast").unlink()
        time.sleep(1.5)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert "cannot write (No space left on device)" in output and "Traceback" not in output
        lines = read_log(out)  # every line whole and parseable
        summary = json.loads((out / "summary.json").read_text())
        assert [line["seq"] for line in lines] == list(range(summary["frames"]))  # none lost, in order
        assert log.stat().st_size > full_size
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        subprocess.run(["umount", "--lazy", str(out)], check=False)


def test_retention_deletes_the_oldest_overlays_first(tmp_path):
    overlays = tmp_path / "overlays" / "2026-11-30"
    overlays.mkdir(parents=True)
    for index in range(10):
        (overlays / f"{index}.jpg").write_bytes(b"x" * 1000)
        os.utime(overlays / f"{index}.jpg", (1000 + index, 1000 + index))
    (tmp_path / "inspections-20261130T000000Z.jsonl").write_bytes(b"{}\n" * 100)
    os.utime(tmp_path / "inspections-20261130T000000Z.jsonl", (900, 900))  # older than every overlay
    budget = DiskBudget(tmp_path, max_bytes=5500)
    assert sorted(p.name for p in overlays.iterdir()) == ["5.jpg", "6.jpg", "7.jpg", "8.jpg", "9.jpg"]
    assert (tmp_path / "inspections-20261130T000000Z.jsonl").is_file()  # logs go only when no overlay is left
    assert budget.total == 5300
    budget = DiskBudget(tmp_path, max_bytes=200)
    assert not overlays.exists() and not (tmp_path / "inspections-20261130T000000Z.jsonl").exists()
    aged = tmp_path / "overlays" / "2026-11-01"
    aged.mkdir(parents=True)
    (aged / "old.jpg").write_bytes(b"x")
    os.utime(aged / "old.jpg", (time.time() - 3 * 86400,) * 2)
    DiskBudget(tmp_path, keep_days=2)
    assert not aged.exists()


def test_overlays_are_not_overwritten_across_restarts_and_go_in_dated_folders(patchcore_bundle, mvtec_like, tmp_path):
    for _ in range(2):
        result = runner.invoke(run_app, [str(patchcore_bundle), "--source", str(mvtec_like / "test" / "pasted"),
                                         "--out", str(tmp_path), "--save", "all"])
        assert result.exit_code == 0, result.output
    saved = list((tmp_path / "overlays").glob("*/*.jpg"))
    assert len(saved) == 12 and len({p.name for p in saved}) == 12
    lines = read_log(tmp_path)
    assert len({line["run"] for line in lines}) == 2 and all(Path(line["overlay"]).is_file() for line in lines)


def test_max_disk_holds_the_run_folder_under_its_budget(patchcore_bundle, mvtec_like, tmp_path):
    video = video_of(mvtec_like / "test" / "pasted", tmp_path / "line.avi", repeat=20)
    out = tmp_path / "o"
    result = runner.invoke(run_app, [str(patchcore_bundle), "--source", str(video), "--out", str(out), "--save", "all",
                                     "--max-disk", "200kB"])
    assert result.exit_code == 0, result.output
    used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != "summary.json")
    assert used <= 200_000
    assert [line["seq"] for line in read_all_logs(out)] == list(range(120))  # overlays go first, not lines
    assert json.loads((out / "summary.json").read_text())["deleted_files"] > 0


def test_one_run_per_out_folder(tmp_path):
    lock = OutLock(tmp_path)
    with pytest.raises(InspectError, match=f"another inspect-run \\(pid {os.getpid()}\\) is writing there"):
        OutLock(tmp_path)
    lock.release()
    OutLock(tmp_path).release()


def test_the_live_view_caps_its_viewers_and_drops_idle_ones():
    view = LiveView("127.0.0.1", 0, max_clients=2, timeout_s=1.0)
    port = int(view.url.rsplit(":", 1)[1].strip("/"))
    try:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", port))
        extra.settimeout(5)
        assert extra.recv(100).startswith(b"HTTP/1.1 503")
        time.sleep(1.5)  # the idle ones time out and give their slots back
        for connection in idle:
            connection.settimeout(5)
            assert connection.recv(100) == b""  # closed by the server
        answer = socket.create_connection(("127.0.0.1", port))
        answer.sendall(b"GET /stats.json HTTP/1.0\r\n\r\n")
        answer.settimeout(5)
        assert answer.recv(100).startswith(b"HTTP/1.0 200")
    finally:
        view.close()


def test_bad_run_options_are_one_line_errors(patchcore_bundle, mvtec_like, tmp_path):
    folder = str(mvtec_like / "test" / "pasted")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    (tmp_path / "a-file").write_text("")
    cases = [
        (["--max-frames", "-1"], "--max-frames must be at least 0"),
        (["--view", "70000"], "--view 70000: a port is 0 to 65535"),
        (["--view", str(busy.getsockname()[1])], "cannot listen there"),
        (["--view", "0", "--view-host", "no.such.host.invalid"], "cannot listen there"),
        (["--out", str(tmp_path / "a-file")], "is a file, not a folder"),
        (["--max-disk", "lots"], "--max-disk 'lots': give a size"),
        (["--keep-days", "nan"], "--keep-days must be a positive number"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["--batch", "1025"], "--batch must be at most 1024"),
        (["--threads", "0"], "--threads must be at least 1"),
    ]
    for extra, message in cases:
        args = [str(patchcore_bundle), "--source", folder, "--out", str(tmp_path / "o"), *extra]
        if "--out" in extra:
            args = [str(patchcore_bundle), "--source", folder, *extra]
        result = runner.invoke(run_app, args)
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
        assert "Traceback" not in result.output
    busy.close()
    assert parse_bytes("50MB", "--max-disk") == 50_000_000 and parse_bytes("2G", "--max-disk") == 2 * 10**9


def test_the_frames_of_all_sources_are_taken_together(mvtec_like):
    from edgeinspect.runtime.capture.grabbers import Grabber, Grabbers
    from edgeinspect.runtime.inference.images import list_images

    stop, condition = threading.Event(), threading.Condition()
    folders = [mvtec_like / "test" / "good", mvtec_like / "test" / "pasted"]
    grabbers = Grabbers([Grabber(FolderSource(list_images(f), f), "every", stop, label=f.name, condition=condition)
                         for f in folders])
    grabbers.start()
    grabbers.join(timeout=10)  # both folders fit in their queues
    batches = []
    while taken := grabbers.take(2):
        batches.append([frame.source for frame in taken])
    assert batches == [["good", "pasted"]] * 6  # one frame of each source in every inference batch


def test_batches_that_do_not_divide_among_the_sources_lose_no_frame(mvtec_like):
    """Three frames a call from two sources: each call takes them in turn and stops at three (it used to pop one
    of every source and throw away what did not fit, 2 of the 12 frames without a trace)."""
    from edgeinspect.runtime.capture.grabbers import Grabber, Grabbers
    from edgeinspect.runtime.inference.images import list_images

    stop, condition = threading.Event(), threading.Condition()
    folders = [mvtec_like / "test" / "good", mvtec_like / "test" / "pasted"]
    grabbers = Grabbers([Grabber(FolderSource(list_images(f), f), "every", stop, label=f.name, condition=condition)
                         for f in folders])
    grabbers.start()
    grabbers.join(timeout=10)
    batches = []
    while taken := grabbers.take(3):
        batches.append([(frame.source, frame.index) for frame in taken])
    assert [len(batch) for batch in batches] == [3, 3, 3, 3]
    assert sorted(sum(batches, [])) == [(source, i) for source in ("good", "pasted") for i in range(6)]


def test_several_sources_in_one_process(patchcore_bundle, mvtec_like, tmp_path):
    good, pasted = str(mvtec_like / "test" / "good"), str(mvtec_like / "test" / "pasted")
    result = runner.invoke(run_app, [str(patchcore_bundle), "--source", good, "--source", pasted, "--out",
                                     str(tmp_path), "--save", "none"])
    assert result.exit_code == 0, result.output
    lines = read_log(tmp_path)
    assert {line["source"] for line in lines} == {good, pasted} and len(lines) == 12
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["sources"][good]["frames"] == summary["sources"][pasted]["frames"] == 6
    assert summary["sources"][pasted]["ng"] >= summary["sources"][good]["ng"]
    single = runner.invoke(run_app, [str(patchcore_bundle), "--source", pasted, "--out", str(tmp_path / "one"),
                                     "--save", "none"])
    assert single.exit_code == 0
    alone = {line["name"]: line["score"] for line in read_log(tmp_path / "one")}
    together = {line["name"]: line["score"] for line in lines if line["source"] == pasted}
    assert np.allclose([together[name] for name in alone], list(alone.values()), rtol=1e-4)
