"""Shared fixtures: a small MVTec-AD-layout data set made of real photos, and the real bottle data when present."""

import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

BOTTLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec_ad" / "bottle"
MAGNETIC_TILE = BOTTLE.parents[1] / "magnetic_tile"


def good_image(rng: np.random.Generator) -> np.ndarray:
    """A crop of a real photo (the coffee cup of scikit-image) with small shifts and sensor noise."""
    photo = skimage.data.coffee()
    y, x = rng.integers(0, 8, 2)
    crop = cv2.resize(photo[100 + y:300 + y, 150 + x:350 + x], (96, 96), interpolation=cv2.INTER_AREA)
    return np.clip(crop + rng.normal(0, 3, crop.shape), 0, 255).astype(np.uint8)


def with_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paste a patch of a different real texture (bricks) and return the image and its mask."""
    image, mask = image.copy(), np.zeros(image.shape[:2], dtype=np.uint8)
    y, x = rng.integers(16, 56, 2)
    patch = skimage.data.brick()[:24, :24]
    image[y:y + 24, x:x + 24] = patch[..., None]
    mask[y:y + 24, x:x + 24] = 255
    return image, mask


def write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image[..., ::-1] if image.ndim == 3 else image)


@pytest.fixture(scope="session")
def mvtec_like(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data") / "cup"
    rng = np.random.default_rng(0)
    for i in range(20):
        write(root / "train" / "good" / f"{i:03d}.png", good_image(rng))
    for i in range(6):
        write(root / "test" / "good" / f"{i:03d}.png", good_image(rng))
        image, mask = with_defect(good_image(rng), rng)
        write(root / "test" / "pasted" / f"{i:03d}.png", image)
        write(root / "ground_truth" / "pasted" / f"{i:03d}_mask.png", mask)
    return root


@pytest.fixture(scope="session")
def bottle() -> Path:
    if not BOTTLE.is_dir():
        pytest.skip(f"real MVTec AD bottle data not present at {BOTTLE}")
    return BOTTLE


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    if not MAGNETIC_TILE.is_dir():
        pytest.skip(f"real magnetic_tile data not present at {MAGNETIC_TILE}")
    return MAGNETIC_TILE


def small_magnetic_tile(root: Path, tmp_path: Path, keep=lambda path: True) -> Path:
    """A few real tiles of different sizes in MVTec layout (links to the files), those for which `keep(path)`
    holds: 12 good to train on, 3 good and 3 blowholes and 3 cracks with their masks to test."""
    def kept(folder, count):
        return [p for p in sorted(folder.iterdir()) if keep(p)][:count]
    data = tmp_path / "tiles"
    links = {data / "train" / "good" / p.name: p for p in kept(root / "train" / "good", 12)}
    links.update({data / "test" / "good" / p.name: p for p in kept(root / "test" / "good", 3)})
    for kind in ("blowhole", "crack"):
        for path in kept(root / "test" / kind, 3):
            links[data / "test" / kind / path.name] = path
            mask = root / "ground_truth" / kind / f"{path.stem}_mask.png"
            links[data / "ground_truth" / kind / mask.name] = mask
    for link, target in links.items():
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, link)
    return data


QUICK_TRAINING = {"patchcore": ["--coreset-ratio", 0.25], "stpm": ["--epochs", 2], "dfr": ["--epochs", 2],
                  "autoencoder": ["--epochs", 2]}


def calibrated_bundle(run_dir: Path, train_args: list, export_args: tuple = ()) -> Path:
    """inspect-train with `train_args` into run_dir, inspect-export, inspect-calibrate; the bundle folder."""
    from typer.testing import CliRunner

    from edgeinspect.calibration.cli import calibrate_app
    from edgeinspect.export.cli import app as export_app
    from edgeinspect.train.cli import app as train_app

    for app, args in [(train_app, [*train_args, "--out", run_dir]), (export_app, [run_dir, *export_args]),
                      (calibrate_app, [run_dir / "bundle"])]:
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
    return run_dir / "bundle"


@pytest.fixture(scope="session", params=list(QUICK_TRAINING))
def kind_bundle(request, mvtec_like, tmp_path_factory) -> Path:
    """One calibrated bundle per model kind (with its fp16 model), trained briefly on the small data set."""
    return calibrated_bundle(tmp_path_factory.mktemp(request.param),
                             [request.param, "--data", mvtec_like, "--image-size", 64, *QUICK_TRAINING[request.param]],
                             ("--fp16",))


@pytest.fixture(scope="session")
def patchcore_bundle(mvtec_like, tmp_path_factory) -> Path:
    """A calibrated PatchCore bundle at 64×64 (for tests that only read it)."""
    return calibrated_bundle(tmp_path_factory.mktemp("patchcore-run"),
                             ["patchcore", "--data", mvtec_like, "--image-size", 64, "--coreset-ratio", 0.25])


def jpeg_frames(folder):
    return [cv2.imencode(".jpg", cv2.imread(str(p)))[1].tobytes() for p in sorted(folder.iterdir())]


@pytest.fixture
def mjpeg_server(mvtec_like):
    """An MJPEG stream on 127.0.0.1; the first connection is cut after `cut_after` frames, later ones stream
    until `limit` frames (0: forever)."""
    frames = jpeg_frames(mvtec_like / "test" / "pasted") + jpeg_frames(mvtec_like / "test" / "good")
    settings = {"cut_after": 0, "limit": 0, "connections": 0}

    class Stream(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            settings["connections"] += 1
            first = settings["connections"] == 1
            self.send_response(200)
            self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
            self.end_headers()
            sent = 0
            while True:
                if first and settings["cut_after"] and sent >= settings["cut_after"]:
                    return  # the camera drops off the network
                if settings["limit"] and sent >= settings["limit"]:
                    return
                data = frames[sent % len(frames)]
                try:
                    self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(data)
                                     + data + b"\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += 1
                time.sleep(0.02)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Stream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/line.mjpg", settings
    server.shutdown()
