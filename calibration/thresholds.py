"""Thresholds from scores of held-out good images, measured through the bundle itself: μ + k·σ (the
default), median + k·1.4826·MAD (robust: one odd good image does not move it), or the (1 − fpr) quantile."""

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import stats

from edgeinspect.runtime.console import InspectError, progress_bar, warn
from edgeinspect.runtime.inference.bundle import Bundle
from edgeinspect.runtime.inference.inspector import Inspector

MIN_IMAGES = 2  # fewer readable good images than this is an error: σ needs two
ROUGH_BELOW = 20  # fewer than this gives a warning: the threshold is a rough estimate
# option value → name stored in bundle.json
METHODS = {"sigma": "mean+k*std", "robust": "median+k*1.4826*mad", "quantile": "quantile"}
MAD_TO_SIGMA = 1.4826  # σ of a normal distribution over its median absolute deviation
PIXELS_PER_IMAGE = 16384  # evenly strided sample of each map, for pixel quantiles and exceedance rates
NORMALITY_P = 0.01  # Shapiro-Wilk p-value below which the μ+kσ rule is flagged


class RunningMoments:
    """Mean and standard deviation of a stream of arrays, in float64, without keeping the values."""

    def __init__(self):
        self.n, self.total, self.total_sq = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64)
        self.n += values.size
        self.total += values.sum()
        self.total_sq += (values**2).sum()

    @property
    def mean(self) -> float:
        return self.total / self.n

    @property
    def std(self) -> float:
        return float(np.sqrt(max(self.total_sq / self.n - self.mean**2, 0.0)))


def threshold_summary(moments: RunningMoments, sample: np.ndarray, method: str, k: float, fpr: float) -> dict:
    """n, μ, σ, the threshold by `method`, and the fraction of the (sampled) good values above it. The robust rule
    is μ + kσ with the median for μ and 1.4826 · the median absolute deviation for σ: equal to it on normal
    scores, and unmoved by a heavy tail."""
    if method == "sigma":
        rule, threshold = {"k": k}, moments.mean + k * moments.std
    elif method == "robust":
        median = float(np.median(sample))
        mad = float(np.median(np.abs(sample - median)))
        if not mad > 0:
            raise InspectError(f"more than half of the {sample.size} good values equal {median:.6g} (median absolute "
                               "deviation 0): the robust rule has no spread to scale; use --method sigma or quantile")
        rule, threshold = {"k": k, "median": median, "mad": mad}, median + k * MAD_TO_SIGMA * mad
    else:
        rule, threshold = {"fpr": fpr}, float(np.quantile(sample, 1 - fpr))
    return {"n": moments.n, "mean": moments.mean, "std": moments.std, **rule, "threshold": threshold,
            "fraction_above": float(np.mean(sample > threshold))}


def normality(scores: np.ndarray) -> dict:
    """Shapiro-Wilk test of the image scores: the μ+kσ rule's false-alarm rate assumes a normal distribution."""
    if len(scores) < 3 or np.ptp(scores) == 0:
        return {"test": "shapiro-wilk", "p": None}
    result = stats.shapiro(scores)
    return {"test": "shapiro-wilk", "p": float(result.pvalue), "skewness": float(stats.skew(scores))}


def calibrate(bundle: Bundle, images: list[Path], k: float = 3.0, source: str = "validation",
              method: str = "sigma", fpr: float = 0.01, precision: str = "auto") -> dict:
    """Store image and pixel thresholds in bundle.json (atomically) and return them."""
    check_options(method, k, fpr)
    if len(images) < MIN_IMAGES:
        raise InspectError(f"{len(images)} good image(s) for calibration: need at least {MIN_IMAGES} (μ+kσ needs a "
                           f"spread; {ROUGH_BELOW} or more for a threshold that is more than a rough estimate)")
    inspector = Inspector(bundle, precision=precision, calibrating=True)
    scores, pixels, pixel_sample = [], RunningMoments(), []
    with progress_bar() as bar:
        task = bar.add_task("calibrating", total=len(images))
        for _, _, anomaly_map, score in inspector.infer_files(images, progress=lambda n: bar.advance(task, n)):
            scores.append(float(score))
            pixels.add(anomaly_map)
            pixel_sample.append(anomaly_map.ravel()[::max(1, anomaly_map.size // PIXELS_PER_IMAGE)])
    scores = np.array(scores)
    if len(scores) < MIN_IMAGES:
        raise InspectError(f"only {len(scores)} of the {len(images)} good images could be read: need at least "
                           f"{MIN_IMAGES} for calibration")
    if not np.isfinite(scores).all():
        raise InspectError(f"the bundle gave {int((~np.isfinite(scores)).sum())} non-finite score(s) on good images: "
                           "no threshold written; re-export the bundle")
    if np.ptp(scores) == 0:
        raise InspectError(f"all {len(scores)} good images have the same score {scores[0]:.6g} (σ = 0: copies of one "
                           "image?): no threshold written; calibrate on varied good images")
    if len(scores) < ROUGH_BELOW:
        warn(f"only {len(scores)} good images for calibration: the threshold is a rough estimate; "
             f"use at least {ROUGH_BELOW}")
    if method == "quantile" and len(scores) * fpr < 1:
        warn(f"{len(scores)} images cannot resolve --fpr {fpr:g} at image level: the threshold is the highest "
             f"good score; use at least {int(np.ceil(1 / fpr))} images")
    image_moments = RunningMoments()
    image_moments.add(scores)
    normal = normality(scores)
    image = threshold_summary(image_moments, scores, method, k, fpr)
    if method == "sigma" and normal["p"] is not None and normal["p"] < NORMALITY_P:
        robust = threshold_summary(image_moments, scores, "robust", k, fpr)
        image["robust_alternative"] = {key: robust[key] for key in ("threshold", "fraction_above")}
        warn(f"good image scores are far from normal (Shapiro-Wilk p = {normal['p']:.2g}, skewness "
             f"{normal['skewness']:.2f}): a heavy tail inflates σ, and μ+{k:g}σ = {image['threshold']:.4g} may pass "
             f"defects; the robust rule would give {robust['threshold']:.4g} (--method robust; "
             f"{100 * robust['fraction_above']:.1f}% of these good images above it)")
    thresholds = {
        "method": METHODS[method],
        "precision": inspector.precision,
        "source": source,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "image": {**image, "normality": normal},
        "pixel": {**threshold_summary(pixels, np.concatenate(pixel_sample), method, k, fpr),
                  "n_images": len(scores)},
    }
    for level in ("image", "pixel"):
        if not math.isfinite(thresholds[level]["threshold"]) or not math.isfinite(thresholds[level]["std"]):
            raise InspectError(f"the {level} threshold came out as {thresholds[level]['threshold']} (μ = "
                               f"{thresholds[level]['mean']}, σ = {thresholds[level]['std']}): not written")
    if not thresholds["pixel"]["std"] > 0:
        raise InspectError("every good anomaly map has the same value everywhere (pixel σ = 0): no threshold "
                           "written; check the bundle")
    bundle.record["thresholds"] = thresholds
    bundle.save()
    return thresholds


def check_options(method: str, k: float, fpr: float) -> None:
    """--method, --k (finite, > 0) and --fpr (0 < fpr < 1), before any image is read."""
    if method not in METHODS:
        raise InspectError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    if not (math.isfinite(k) and k > 0):
        raise InspectError(f"--k must be a finite number above 0, got {k:g}")
    if not 0 < fpr < 1:
        raise InspectError(f"--fpr must be between 0 and 1 (exclusive), got {fpr:g}")
