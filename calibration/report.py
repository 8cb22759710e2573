"""inspect-eval --report: one self-contained HTML file (images embedded) that shows what the metrics mean:
the table, ROC and per-region-overlap curves, good vs defective score histograms with the calibrated
threshold, and a gallery of the worst misses, false alarms and typical detections."""

import base64
import html
import io
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_curve

from edgeinspect.runtime.datasets import Dataset
from edgeinspect.runtime.files import atomic_write_bytes
from edgeinspect.runtime.inference.bundle import Bundle
from edgeinspect.runtime.inference.images import read_image, resize
from edgeinspect.runtime.inference.regions import heat_overlay

from .evaluate import METRIC_COLUMNS, Predictions, metrics_rows
from .metrics import pro_curve

GALLERY_SIZE = 4  # examples per gallery section
TILE = 224  # pixels per gallery panel


def write_report(folder: Path, bundle: Bundle, dataset: Dataset, predictions: Predictions, result: dict) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    thresholds = bundle.thresholds or {}
    image_threshold = thresholds.get("image", {}).get("threshold")
    pixel_threshold = thresholds.get("pixel", {}).get("threshold")
    sections = [
        ("Metrics", metrics_table(result)),
        ("Curves", figure_tag(curves_figure(predictions), "ROC and per-region-overlap curves")),
        ("Scores", figure_tag(histogram_figure(predictions, image_threshold), "score histograms")
         + rates_paragraph(predictions, image_threshold)),
        ("Gallery", gallery(predictions, image_threshold, pixel_threshold, bundle.input_size)),
    ]
    title = f"edge-inspect evaluation: {bundle.record['model']} on {dataset.name}"
    body = "".join(f'<section id="{name.lower()}"><h2>{name}</h2>{content}</section>' for name, content in sections)
    page = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}th{{background:#eee}}img{{max-width:100%}}
figure{{margin:1em 0}}figcaption{{color:#555}}</style></head><body><h1>{html.escape(title)}</h1>
<p>bundle {html.escape(str(bundle.path))}; {result['n_images']} test images; thresholds:
{html.escape(str(thresholds.get('method', 'not calibrated')))}</p>{body}</body></html>"""
    path = Path(folder) / "report.html"
    atomic_write_bytes(path, page.encode())
    return path


def metrics_table(result: dict) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in METRIC_COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                   for row in metrics_rows(result))
    return f'<table class="metrics"><tr>{head}</tr>{rows}</table>'


def png_data_uri(image_bgr: np.ndarray) -> str:
    _, data = cv2.imencode(".png", image_bgr)
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode()


def figure_tag(figure, caption: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return f'<figure><img src="{uri}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def curves_figure(predictions: Predictions):
    import matplotlib.pyplot as plt

    with_pixels = predictions.masks is not None and predictions.masks.any()
    figure, axes = plt.subplots(1, 2 if with_pixels else 1, figsize=(11 if with_pixels else 5.5, 4.5), squeeze=False)
    roc = axes[0, 0]
    if predictions.labels.any() and not predictions.labels.all():
        fpr, tpr, _ = roc_curve(predictions.labels, predictions.scores)
        roc.plot(fpr, tpr, label="image")
    if with_pixels:
        fpr, tpr, _ = roc_curve(predictions.masks.ravel(), predictions.maps.ravel())
        roc.plot(fpr, tpr, label="pixel")
        fpr, pro = pro_curve(predictions.maps, predictions.masks)
        keep = fpr <= 0.3
        axes[0, 1].plot(fpr[keep], pro[keep])
        axes[0, 1].set(xlabel="false-positive rate (pixels)", ylabel="per-region overlap", xlim=(0, 0.3),
                       ylim=(0, 1), title="PRO curve (AUPRO integrates it to FPR 0.3)")
    roc.plot([0, 1], [0, 1], ":", color="grey")
    roc.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC")
    roc.legend()
    return figure


def histogram_figure(predictions: Predictions, threshold: float | None):
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    bins = np.histogram_bin_edges(predictions.scores, bins=40)
    axis.hist(predictions.scores[~predictions.labels], bins=bins, alpha=0.6, label="good")
    axis.hist(predictions.scores[predictions.labels], bins=bins, alpha=0.6, label="defective")
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    axis.set(xlabel="image score", ylabel="test images", title="Image scores")
    axis.legend()
    return figure


def rates_paragraph(predictions: Predictions, threshold: float | None) -> str:
    if threshold is None:
        return "<p>Not calibrated: no threshold to judge by (run inspect-calibrate).</p>"
    flagged = predictions.scores > threshold
    good, defective = ~predictions.labels, predictions.labels
    false_alarms = flagged[good].mean() if good.any() else float("nan")
    misses = (~flagged[defective]).mean() if defective.any() else float("nan")
    return (f'<p class="rates">At the calibrated threshold {threshold:.4g}: false-alarm rate '
            f"{100 * false_alarms:.1f}% of {int(good.sum())} good images, miss rate {100 * misses:.1f}% of "
            f"{int(defective.sum())} defective images.</p>")


def gallery(predictions: Predictions, image_threshold: float | None, pixel_threshold: float | None,
            size: tuple[int, int]) -> str:
    """Worst misses (defective, lowest scores), false alarms (good, highest scores) and typical detections
    (defective, median score), each as image | heat map | thresholded regions | ground truth."""
    scores, labels = predictions.scores, predictions.labels
    defective, good = np.flatnonzero(labels), np.flatnonzero(~labels)
    ranked_defective = defective[np.argsort(scores[defective])]
    ranked_good = good[np.argsort(-scores[good])]
    middle = max(0, len(ranked_defective) // 2 - GALLERY_SIZE // 2)
    groups = [("Worst misses (the lowest-scoring defective images)", ranked_defective[:GALLERY_SIZE]),
              ("False alarms (the highest-scoring good images)", ranked_good[:GALLERY_SIZE]),
              ("Typical detections", ranked_defective[middle:middle + GALLERY_SIZE])]
    parts = []
    for title, indices in groups:
        tiles = "".join(gallery_tile(predictions, i, image_threshold, pixel_threshold, size) for i in indices)
        parts.append(f'<h3>{title}</h3><div class="gallery">{tiles or "<p>none</p>"}</div>')
    return "".join(parts)


def gallery_tile(predictions: Predictions, index: int, image_threshold, pixel_threshold, size) -> str:
    image = resize(read_image(predictions.paths[index]), size)
    anomaly_map = predictions.maps[index]
    truth = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if predictions.masks is not None:
        contours, _ = cv2.findContours(predictions.masks[index].astype(np.uint8), cv2.RETR_EXTERNAL,
                                       cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(truth, contours, -1, (0, 255, 0), 2)
    panels = [cv2.cvtColor(image, cv2.COLOR_RGB2BGR), heat_overlay(image, anomaly_map, None),
              heat_overlay(image, anomaly_map, pixel_threshold), truth]
    strip = np.hstack([cv2.resize(p, (TILE, TILE), interpolation=cv2.INTER_AREA) for p in panels])
    verdict = "" if image_threshold is None else (" NG" if predictions.scores[index] > image_threshold else " OK")
    path = predictions.paths[index]
    caption = f"{path.parent.name}/{path.name}: {predictions.types[index]}, score {predictions.scores[index]:.4g}{verdict}"
    return (f'<figure><img src="{png_data_uri(strip)}" alt="{html.escape(caption)}"><figcaption>'
            f"{html.escape(caption)} (image · heat map · regions above the pixel threshold · ground truth)"
            "</figcaption></figure>")
