"""inspect-eval --report on a small real run: every section, decodable images, the JSON's numbers, and a
clean load in headless Chromium."""

import base64
import json
import re
import shutil
import subprocess

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgeinspect.calibration.cli import calibrate_app, eval_app
from edgeinspect.export.cli import app as export_app
from edgeinspect.train.cli import app as train_app

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(mvtec_like, tmp_path_factory):
    work = tmp_path_factory.mktemp("report")
    for app, args in [(train_app, ["patchcore", "--data", mvtec_like, "--out", work / "run", "--image-size", 64]),
                      (export_app, [work / "run"]), (calibrate_app, [work / "run" / "bundle"]),
                      (eval_app, [work / "run" / "bundle", "--data", mvtec_like, "--out", work / "eval.json",
                                  "--report", work / "report"])]:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return work / "report" / "report.html", json.loads((work / "eval.json").read_text())


def test_report_has_every_section_and_decodable_images(report):
    page = report[0].read_text()
    for section in ("metrics", "curves", "scores", "gallery"):
        assert f'<section id="{section}">' in page
    for heading in ("Worst misses", "False alarms", "Typical detections"):
        assert heading in page
    assert "src=\"http" not in page and "src=\"file" not in page  # self-contained
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) >= 2 + 3
    for data in images:
        decoded = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        assert decoded is not None and decoded.size > 0


def test_report_numbers_equal_the_json_metrics(report):
    page, result = report[0].read_text(), report[1]
    rows = dict(re.findall(r"<tr><td>([^<]+)</td>(.*?)</tr>", page))
    for group, metrics in result["metrics"].items():
        cells = re.findall(r"<td>([^<]*)</td>", rows[group])
        assert cells[1] == f"{metrics['image_auroc']:.3f}"
        assert cells[2] == f"{metrics['pixel_auroc']:.3f}" and cells[3] == f"{metrics['aupro']:.3f}"
    overall = result["metrics"]["overall"]["at_threshold"]
    assert f"false-alarm rate {100 * overall['false_positive_rate']:.1f}%" in page


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian package chromium)")
def test_report_loads_in_headless_chromium(report, tmp_path):
    probe = tmp_path / "probe.html"
    check = ("<script>addEventListener('load',()=>{const bad=[...document.images].filter(i=>!i.naturalWidth);"
             "if(bad.length)console.error('broken images: '+bad.length);"
             "document.body.dataset.images=document.images.length+':'+bad.length;});</script>")
    probe.write_text(report[0].read_text().replace("</body>", check + "</body>"))
    common = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    count, broken = re.search(r'data-images="(\d+):(\d+)"', dom.stdout).groups()
    assert int(count) >= 5 and broken == "0"
    console_errors = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console_errors, console_errors
    shot = tmp_path / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,2000", report[0].as_uri()],
                   capture_output=True, timeout=120)
    image = cv2.imread(str(shot))
    assert image is not None and image.std() > 10  # rendered content, not a blank page
