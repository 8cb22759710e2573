"""The operator's loop end to end, in headless Chromium against a real inspect-run: NG frames of good parts under a
new lamp marked "good part" and a pasted defect marked "confirmed defect" with the page's buttons, "Teach" pressed,
the running line scoring with version 2 without a frame lost or repeated, and new frames of the lamp passing."""

import json
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from conftest import good_image, write
from test_operator_page import (chromium, inspect_run, needs_chromium, page, read_log, stats_of,  # noqa: F401
                                wait_until, watched_folder)


def lamp_frames(folder: Path, count: int, seed: int) -> list[Path]:
    """Good parts under a new lamp (35% brighter), which the bundle flags."""
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        paths.append(folder / f"lamp-{seed}-{index:03d}.png")
        write(paths[-1], np.clip(good_image(rng) * 1.35, 0, 255).astype(np.uint8))
    return paths


def feed(folder: Path, images: list[Path], prefix: str, every_s: float = 0.7) -> None:
    """Into the watched folder one at a time, slower than the NG strip's rate (2 a second)."""
    for index, image in enumerate(images):
        shutil.copy(image, folder / f"{prefix}-{index:03d}.png")
        time.sleep(every_s)


@needs_chromium
def test_marking_false_alarms_and_teaching_from_the_page(chromium, patchcore_bundle, mvtec_like, tmp_path):  # noqa: F811
    bundle = tmp_path / "line" / "bundle"
    shutil.copytree(patchcore_bundle, bundle)
    folder = watched_folder(tmp_path, sorted((mvtec_like / "test" / "good").iterdir())[:2])
    taught, later = lamp_frames(tmp_path / "lamp", 12, 1), lamp_frames(tmp_path / "lamp-later", 4, 2)
    out = tmp_path / "out"
    with inspect_run(bundle, out, "--source", folder, "--watch") as run:
        wait_until(lambda: stats_of(run)["frames"] == 2, 60, "the first frames")
        with page(chromium, run.url) as tools:
            for batch, frames in enumerate([(taught[:4], []), (taught[4:8], []), (taught[8:], [("pasted", "defect")])]):
                lamps, others = frames
                feed(folder, lamps, f"lamp{batch}")
                feed(folder, sorted((mvtec_like / "test" / "pasted").iterdir())[:len(others)], "pasted")
                wait_until(lambda: stats_of(run)["frames"] == 2 + 4 * (batch + 1) + len(others), 60, "the NG frames")
                marks = [*((f"lamp{batch}-{i:03d}.png", "good") for i in range(4)), ("pasted-000.png", "defect")]
                for name, label in marks[:4 + len(others)]:
                    selector = f".thumb[data-name=\"{name}\"]"
                    tools.wait_for(f"document.querySelector('{selector}') !== null", what=f"{name} in the strip")
                    tools.evaluate(f"document.querySelector('{selector}').click()")
                    tools.wait_for("document.getElementById('viewer').open && "
                                   "!document.getElementById('viewer-labels').hidden", what="the viewer's buttons")
                    tools.evaluate(f"document.getElementById('mark-{label}').click()")
                    tools.wait_for("!document.getElementById('viewer').open", what=f"{name} saved as {label}")
            tools.wait_for("document.getElementById('teach-counts').textContent === 'marked: 12 good parts, 1 defect'",
                           what="the counts")
            tools.wait_for("document.querySelectorAll('.thumb.good').length === 7", what="the strip's marks")
            tools.screenshot(tmp_path / "page-teach.png")
            tools.evaluate("document.getElementById('teach-button').click()")
            tools.wait_for("document.body.dataset.version === '2'", timeout_s=120, what="version 2 on the line")
            state = tools.evaluate("document.getElementById('teach-state').textContent")
            assert state == "version 2 written; the line takes it in"
        feed(folder, later, "later")
        wait_until(lambda: stats_of(run)["frames"] == 19, 60, "the later lamp frames")
    log = [line for line in read_log(out) if "seq" in line]
    assert [line["seq"] for line in log] == list(range(len(log))) and len(log) == 19
    by_name = {line["name"]: line for line in log}
    assert all(by_name[f"lamp{b}-{i:03d}.png"]["verdict"] == "NG" for b in range(3) for i in range(4))
    assert all(by_name[f"later-{i:03d}.png"]["verdict"] == "OK" and by_name[f"later-{i:03d}.png"]["version"] == 2
               for i in range(4))
    assert by_name["pasted-000.png"]["verdict"] == "NG"
    kept = sorted((out / "labels" / "good").glob("*.png"))
    assert len(kept) == 12 and len(list((out / "labels" / "defect").glob("*.png"))) == 1
    record = json.loads((out / "labels" / "records" / f"{kept[0].stem}.json").read_text())
    assert record["label"] == "good" and record["score"] > record["threshold"]
    batch, index = int(record["name"][4]), int(record["name"][6:9])
    original = cv2.imread(str(taught[4 * batch + index]))
    assert np.array_equal(cv2.imread(str(kept[0])), original)  # as received, lossless
    version = json.loads((bundle / "bundle.json").read_text())["version"]
    assert version["by"] == "operator page" and version["taught"]["defects_checked"] == 1


def test_labels_need_the_token_json_a_known_label_and_a_kept_frame(tmp_path):
    """POST /label and /teach: signed in only, application/json only (a form of another site cannot send it),
    one of the two labels, a frame the strip still keeps; teaching with nothing marked says so."""
    import urllib.error
    import urllib.request

    from edgeinspect.runtime.outputs.labels import LabelStore, TeachJob
    from edgeinspect.runtime.outputs.live_view import LiveView

    labels = LabelStore(tmp_path)
    view = LiveView("127.0.0.1", 0, token="secret-token", labels=labels,
                    teaching=TeachJob(lambda good, defects: 2, labels))
    view.add_ng({"id": "run-7", "name": "a.png", "score": 9.0}, None, np.zeros((8, 8, 3), np.uint8))

    def post(path, body, token="secret-token", kind="application/json"):
        request = urllib.request.Request(view.url.rstrip("/") + path, data=body.encode(), method="POST",
                                         headers={"Content-Type": kind, **({"Authorization": f"Bearer {token}"}
                                                                            if token else {})})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            body = error.read()
            return error.code, json.loads(body) if error.headers.get("Content-Type") == "application/json" else None

    try:
        assert post("/label", '{"id": "run-7", "label": "good"}', token=None)[0] == 401
        assert post("/label", "id=run-7&label=good", kind="application/x-www-form-urlencoded")[0] == 415
        assert post("/label", "[1, 2]")[0] == 400
        assert post("/label", '{"id": "run-7", "label": "maybe"}')[0] == 400
        assert post("/label", '{"id": "run-1", "label": "good"}')[0] == 404
        assert post("/teach", "{}") == (409, {"state": "idle", "message": "no frame is marked as a good part yet"})
        status, answer = post("/label", '{"id": "run-7", "label": "good"}')
        assert status == 200 and answer["labels"] == {"good": 1, "defect": 0}
        assert post("/label", '{"id": "run-7", "label": "defect"}')[1]["labels"] == {"good": 0, "defect": 1}
        assert sorted(p.name for p in (tmp_path / "labels").rglob("*.*")) == ["run-7.json", "run-7.png"]
    finally:
        view.close()


def test_a_line_with_trust_does_not_teach_from_the_page(tmp_path):
    """A taught version must be signed to run under --trust, and the page holds no key: it says how instead."""
    import pytest

    from edgeinspect.runtime.commands.run import teacher
    from edgeinspect.runtime.console import InspectError

    with pytest.raises(InspectError, match=r"runs with --trust: a taught version must be signed.*--sign KEY"):
        teacher(tmp_path / "bundle", [tmp_path / "line.pub"])(tmp_path / "good", None)
