"""--image-size auto: the input's aspect and size from the training images, on synthetic sets of known sizes and
aspects, and end to end on real magnetic_tile tiles of many sizes."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from edgeinspect.calibration.cli import eval_app
from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.inference.images import read_image
from edgeinspect.runtime.inference.inspector import Inspector
from edgeinspect.train.input_size import PIXEL_BUDGET, PIXEL_FLOOR, choose_input_size, image_sizes

from conftest import calibrated_bundle, small_magnetic_tile, write


def test_square_images_larger_than_the_budget_are_downscaled_to_it():
    """900×900 (bottle's camera): square, the largest multiple of 16 within 448×448 pixels."""
    geometry = choose_input_size([(900, 900)] * 20, 16)
    assert geometry.size == (448, 448) and "downscaled 2×" in geometry.reason


def test_long_parts_keep_their_aspect_within_the_budget():
    """About 1240×500, as long parts on a line: the input keeps the aspect (2.5) with sides in multiples of 16, at
    most the budget's pixels, and neither side upscaled."""
    sizes = [(1230 + 2 * i, 500) for i in range(30)]
    height, width = choose_input_size(sizes, 16).size
    assert height % 16 == 0 and width % 16 == 0
    assert height * width <= PIXEL_BUDGET and height * width > 0.9 * PIXEL_BUDGET
    assert height / width == pytest.approx(2.49, abs=0.1) and height <= 1230 and width <= 500
    assert choose_input_size([(500, 1240)] * 5, 16).size == (width, height)  # the same part, lying down


def test_images_between_floor_and_budget_keep_their_own_resolution():
    """300×300 (the solar cells): 288×288, the largest multiple of 16 that is not upscaled."""
    assert choose_input_size([(300, 300)] * 10, 16).size == (288, 288)
    assert choose_input_size([(300, 300)] * 10, 32).size == (288, 288)
    assert choose_input_size([(300, 400)] * 10, 32).size == (288, 384)


def test_tiny_images_are_upscaled_to_the_floor():
    geometry = choose_input_size([(64, 64)] * 10, 16)
    assert geometry.size == (256, 256) and geometry.size[0] ** 2 == PIXEL_FLOOR and "upscaled 4×" in geometry.reason


def test_portrait_and_landscape_images_together_get_a_square_input():
    """A quarter or more each way: no one aspect fits, so square; the pixels of the smallest quarter, so three
    in four images are not upscaled."""
    sizes = [(200, 400)] * 10 + [(400, 300)] * 10 + [(600, 600)] * 10 + [(420, 360)] * 10
    geometry = choose_input_size(sizes, 16)
    quarter = np.quantile([h * w for h, w in sizes], 0.25)  # 110,000 pixels
    assert geometry.size == (320, 320) and 320**2 <= quarter < 336**2
    assert "portrait and landscape" in geometry.reason and geometry.aspect_range == (0.5, 1.3333)


def test_images_of_one_orientation_but_mixed_lengths_take_the_median_aspect():
    sizes = [(400, 200)] * 5 + [(600, 200)] * 10 + [(800, 200)] * 5  # aspects 2, 3, 4
    height, width = choose_input_size(sizes, 16).size
    assert height / width == pytest.approx(3, rel=0.1)


def test_extreme_aspects_are_bounded_and_no_size_is_refused():
    height, width = choose_input_size([(100, 3000)] * 4, 16).size
    assert width / height == pytest.approx(8, rel=0.15)
    with pytest.raises(InspectError, match="could be read as images"):
        choose_input_size([], 16)


def test_sizes_come_from_the_headers_and_unreadable_files_are_left_out(tmp_path):
    write(tmp_path / "a.png", np.zeros((30, 50, 3), np.uint8))
    write(tmp_path / "b.jpg", np.zeros((70, 20), np.uint8))
    (tmp_path / "c.png").write_bytes(b"not an image")
    assert image_sizes(sorted(tmp_path.iterdir())) == [(30, 50), (70, 20)]


@pytest.mark.slow
def test_real_tiles_of_many_sizes_get_a_non_square_input_end_to_end(magnetic_tile, tmp_path):
    """Real portrait tiles of different sizes through inspect-train at its default (auto), export, calibrate and
    eval: the input follows the tiles' median aspect, the bundle records the choice, and every test image (each of
    its own size, stretched as in training) is scored against masks read at the map's size."""
    data = small_magnetic_tile(magnetic_tile, tmp_path, keep=lambda path: np.divide(*read_image(path).shape[:2]) > 1.3)
    bundle = calibrated_bundle(tmp_path / "run", ["patchcore", "--data", data, "--coreset-ratio", 0.25])
    fitted = image_sizes(json.loads((tmp_path / "run" / "run.json").read_text())["data"]["fit"])
    assert len(set(fitted)) > 3  # the images really are of different sizes
    height, width = load_bundle(bundle).input_size
    aspects = [h / w for h, w in fitted]
    assert height > width and height % 16 == 0 and width % 16 == 0
    assert height / width == pytest.approx(np.median(aspects), rel=0.1)
    geometry = load_bundle(bundle).record["training"]["input_geometry"]
    assert geometry["chosen_by"] == "auto" and geometry["size"] == [height, width]
    result = CliRunner().invoke(eval_app, [str(bundle), "--data", str(data), "--out", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    overall = json.loads((tmp_path / "eval.json").read_text())["metrics"]["overall"]
    assert overall["n_defective"] == 6 and overall["pixel_auroc"] > 0.5


def test_a_frame_unlike_the_training_images_is_stretched_and_named_once(patchcore_bundle, capsys):
    """The bundle was trained on square images: a square frame of another size passes quietly, a 96×200 one is
    stretched to the input like any other and named in one warning, and the next such frame adds none."""
    inspector = Inspector(load_bundle(patchcore_bundle))
    assert inspector.prepare(np.zeros((150, 150, 3), np.uint8)).shape == (64, 64, 3)
    assert "unlike the training images" not in capsys.readouterr().err
    for _ in range(2):
        assert inspector.prepare(np.zeros((96, 200, 3), np.uint8)).shape == (64, 64, 3)
    assert capsys.readouterr().err.count("frames of 200×96 (height/width 0.48) are unlike the training images") == 1
