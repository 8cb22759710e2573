"""The production frame loop: an HTTP MJPEG stream served here (with a disconnect), a video in `latest`
mode, and a clean stop on SIGTERM with the summary, in a real subprocess."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgeinspect.runtime.commands.run import app as run_app

runner = CliRunner()


def read_log(out):
    return [json.loads(line) for line in (out / "inspections.jsonl").read_text().splitlines()]


def test_stream_that_disconnects_is_reopened_and_the_run_goes_on(patchcore_bundle, mjpeg_server, tmp_path):
    url, settings = mjpeg_server
    settings["cut_after"] = 10
    result = runner.invoke(run_app, [str(patchcore_bundle), "--source", url, "--out", str(tmp_path),
                                     "--max-frames", "25", "--mode", "every", "--save", "none"])
    assert result.exit_code == 0, result.output
    assert "reconnected" in result.output
    lines = read_log(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(lines) == summary["frames"] == 25 and summary["reconnects"] >= 1
    assert set(lines[0]["latency_ms"]) == {"capture", "preprocess", "inference", "postprocess"}
    assert {"p50", "p95", "p99"} <= set(summary["total_ms"])


def test_latest_mode_counts_every_frame_it_skips(patchcore_bundle, mvtec_like, tmp_path):
    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (96, 96))
    frames = [cv2.imread(str(p)) for p in sorted((mvtec_like / "test" / "good").iterdir())] * 40
    for frame in frames:
        writer.write(frame)
    writer.release()
    result = runner.invoke(run_app, [str(patchcore_bundle), "--source", str(video), "--out", str(tmp_path / "o"),
                                     "--mode", "latest", "--save", "none"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["frames"] + summary["dropped"] == len(frames)
    assert len(read_log(tmp_path / "o")) == summary["frames"]


def test_batches_give_the_same_scores_as_single_frames(patchcore_bundle, mvtec_like, tmp_path):
    folder = mvtec_like / "test" / "pasted"
    for name, batch in (("one", "1"), ("four", "4")):
        result = runner.invoke(run_app, [str(patchcore_bundle), "--source", str(folder), "--out",
                                         str(tmp_path / name), "--batch", batch, "--save", "none"])
        assert result.exit_code == 0, result.output
    one, four = read_log(tmp_path / "one"), read_log(tmp_path / "four")
    assert [r["name"] for r in one] == [r["name"] for r in four]
    assert np.allclose([r["score"] for r in one], [r["score"] for r in four], rtol=1e-4)


def test_sigterm_stops_cleanly_with_a_summary_and_no_lost_line(patchcore_bundle, mjpeg_server, tmp_path):
    url, _ = mjpeg_server
    command = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()", str(patchcore_bundle),
               "--source", url, "--out", str(tmp_path), "--save", "none"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, COLUMNS="200"))
    log = tmp_path / "inspections.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == 0, output
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["frames"] >= 5 and len(read_log(tmp_path)) == summary["frames"]
    assert summary["backend"] == "openvino"
    assert f"{summary['frames']} frames" in output and "p99" in output and "Traceback" not in output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package chromium)")
def test_live_view_page_shows_a_frame_in_headless_chromium(patchcore_bundle, mjpeg_server, tmp_path):
    url, _ = mjpeg_server
    command = [sys.executable, "-c", "from edgeinspect.runtime.commands.run import main; main()", str(patchcore_bundle),
               "--source", url, "--out", str(tmp_path), "--save", "none", "--view", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=dict(os.environ, COLUMNS="200"))
    lines = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not any("live view on" in line for line in lines):
            time.sleep(0.2)
        page = next(line for line in lines if "live view on" in line).split("live view on ")[1].strip()
        while time.time() < deadline and not (tmp_path / "inspections.jsonl").is_file():
            time.sleep(0.2)
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                              "--dump-dom", page], capture_output=True, text=True, timeout=120).stdout
        assert re.search(r'data-frames="[1-9]\d*"', dom), dom[:2000]
        assert re.search(r'data-frame-width="96"', dom), dom[:2000]  # the camera's own frame size
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    assert process.returncode == 0, "".join(lines)


def test_inspect_bench_reports_backends_and_the_pipeline(patchcore_bundle, tmp_path):
    from edgeinspect.runtime.commands.bench import app as bench_app

    result = runner.invoke(bench_app, [str(patchcore_bundle), "--frames", "20", "--runs", "3", "--batch", "2",
                                       "--out", str(tmp_path / "bench.json")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["backends"]["ort-cpu"]["ms_per_frame_batch1"] > 0
    assert report["backends"]["openvino"]["ms_per_frame_batch1"] > 0
    assert report["pipeline"]["backend"] == "openvino"
    assert "unavailable" in report["backends"]["tensorrt"] or report["backends"]["tensorrt"]["ms_per_frame_batch1"] > 0
    assert report["pipeline"]["frames"] == 20 and 0 <= report["pipeline"]["outside_inference_share_p50"] < 1
    assert "outside inference" in result.output


def test_inspector_keeps_numpy_blas_off_the_inference_cores(patchcore_bundle):
    from threadpoolctl import threadpool_info, threadpool_limits

    from edgeinspect.runtime.inference.bundle import load_bundle
    from edgeinspect.runtime.inference.inspector import Inspector

    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    if not blas:
        pytest.skip("numpy has no BLAS with a thread pool here")
    with threadpool_limits(2, user_api="blas"):  # restored afterwards for the other tests
        Inspector(load_bundle(patchcore_bundle))
        assert all(pool["num_threads"] == 1 for pool in threadpool_info() if pool["user_api"] == "blas")
