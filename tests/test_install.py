"""The base install is the edge runtime alone: `pip install -e .` into a fresh virtual environment brings
neither torch nor timm nor an ONNX Runtime, and inspect-run runs a bundle there (on OpenVINO)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_base_install_runs_a_bundle_without_torch(patchcore_bundle, mvtec_like, tmp_path):
    venv = tmp_path / "edge-box"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", str(ROOT)],
                             capture_output=True, text=True, timeout=1500)
    assert install.returncode == 0, install.stderr[-3000:]
    installed = subprocess.run([str(python), "-m", "pip", "list", "--format=json"], capture_output=True, text=True,
                               check=True).stdout
    names = {package["name"].lower() for package in json.loads(installed)}
    assert not names & {"torch", "torchvision", "timm", "onnxruntime", "onnxruntime-gpu"}, names
    assert {"openvino", "opencv-python", "numpy"} <= names
    out = tmp_path / "out"
    run = subprocess.run([str(venv / "bin" / "inspect-run"), str(patchcore_bundle), "--source",
                          str(mvtec_like / "test" / "pasted"), "--out", str(out)], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = (out / "inspections.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["verdict"] in ("OK", "NG") for line in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "openvino" and summary["frames"] == 6


def test_the_wheel_carries_the_operator_page(tmp_path):
    """A non-editable install gets the page's files too: they are package data of edgeinspect.runtime.outputs."""
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    names = zipfile.ZipFile(next(tmp_path.glob("edge_inspect-*.whl"))).namelist()
    assert {f"edgeinspect/runtime/outputs/operator_page/page.{suffix}" for suffix in ("html", "css", "js")} <= set(names)
