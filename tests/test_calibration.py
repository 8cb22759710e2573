"""Threshold rules, the normality check behind μ+3σ, and the calibration summary stored in the bundle."""


import numpy as np
import pytest
from typer.testing import CliRunner

from edgeinspect.calibration.cli import calibrate_app
from edgeinspect.calibration.thresholds import RunningMoments, normality, threshold_summary
from edgeinspect.runtime.inference.bundle import load_bundle
from edgeinspect.runtime.console import InspectError
from edgeinspect.runtime.inference.inspector import Inspector


def summary(values, method, k=3.0, fpr=0.1):
    moments = RunningMoments()
    moments.add(values)
    return threshold_summary(moments, np.asarray(values), method, k, fpr)


def test_sigma_and_quantile_rules_and_the_fraction_above():
    values = np.arange(100, dtype=float)
    sigma = summary(values, "sigma", k=1.0)
    assert sigma["threshold"] == pytest.approx(values.mean() + values.std())
    assert sigma["fraction_above"] == pytest.approx(np.mean(values > sigma["threshold"]))
    quantile = summary(values, "quantile", fpr=0.1)
    assert quantile["threshold"] == pytest.approx(np.quantile(values, 0.9))
    assert quantile["fraction_above"] == pytest.approx(0.1)


def test_robust_rule_against_a_hand_computation():
    """Nine ordinary good scores and one odd one: median 5.5, absolute deviations 0.5, 0.5, 1.5, 1.5, 2.5, 2.5,
    3.5, 3.5, 4.5, 94.5 → MAD 2.5, threshold 5.5 + 3 · 1.4826 · 2.5 = 16.6195, which the odd image exceeds; μ + 3σ
    (14.5 + 3 · 28.6) is pulled above it by that one image."""
    values = [1, 2, 3, 4, 5, 6, 7, 8, 9, 100]
    robust = summary(values, "robust")
    assert (robust["median"], robust["mad"]) == (5.5, 2.5)
    assert robust["threshold"] == pytest.approx(16.6195)
    assert robust["fraction_above"] == pytest.approx(0.1)
    assert summary(values, "sigma")["fraction_above"] == 0


def test_robust_rule_refuses_scores_without_spread():
    with pytest.raises(InspectError, match="median absolute deviation 0"):
        summary([1.0, 1.0, 1.0, 2.0], "robust")


def test_normality_flags_skewed_scores_only():
    rng = np.random.default_rng(0)
    assert normality(rng.normal(10, 1, 60))["p"] > 0.01
    assert normality(rng.lognormal(0, 1.2, 60))["p"] < 0.01
    assert normality(np.ones(5))["p"] is None


@pytest.fixture
def bundle_copy(mvtec_like, tmp_path):
    from edgeinspect.export.cli import app as export_app
    from edgeinspect.train.cli import app as train_app

    runner = CliRunner()
    run_dir = tmp_path / "run"
    for app, args in [(train_app, ["patchcore", "--data", mvtec_like, "--out", run_dir, "--image-size", 64]),
                      (export_app, [run_dir])]:
        assert runner.invoke(app, [str(a) for a in args]).exit_code == 0
    return run_dir / "bundle"


def test_quantile_calibration_is_stored_and_summarised(bundle_copy, mvtec_like):
    good = mvtec_like / "train" / "good"
    result = CliRunner().invoke(calibrate_app, [str(bundle_copy), "--images", str(good), "--method", "quantile",
                                                "--fpr", "0.1"])
    assert result.exit_code == 0, result.output
    assert "good above it" in result.output and "0.9 quantile" in result.output
    thresholds = load_bundle(bundle_copy).thresholds
    scores = [float(s) for *_, s in Inspector(load_bundle(bundle_copy)).infer_files(sorted(good.iterdir()))]
    assert thresholds["method"] == "quantile" and thresholds["image"]["n"] == 20
    assert thresholds["image"]["threshold"] == pytest.approx(np.quantile(scores, 0.9), rel=1e-5)
    assert thresholds["image"]["fraction_above"] == pytest.approx(0.1)
    assert 0 <= thresholds["image"]["normality"]["p"] <= 1


def test_robust_calibration_is_measured_through_the_bundle(bundle_copy, mvtec_like):
    good = mvtec_like / "train" / "good"
    result = CliRunner().invoke(calibrate_app, [str(bundle_copy), "--images", str(good), "--method", "robust"])
    assert result.exit_code == 0, result.output
    assert "median + 3·1.4826·MAD" in result.output
    thresholds = load_bundle(bundle_copy).thresholds
    scores = np.array([float(s) for *_, s in Inspector(load_bundle(bundle_copy)).infer_files(sorted(good.iterdir()))])
    median = np.median(scores)
    assert thresholds["method"] == "median+k*1.4826*mad"
    assert thresholds["image"]["threshold"] == pytest.approx(
        median + 3 * 1.4826 * np.median(np.abs(scores - median)), rel=1e-5)
