"""Detection and segmentation metrics as in the MVTec AD evaluation."""

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    labels = np.asarray(labels).ravel()
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, np.asarray(scores).ravel()))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> dict:
    """The best F1 over all thresholds, and the threshold that reaches it."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return {"f1": float(f1[best]), "threshold": float(thresholds[best]) if len(thresholds) else None}


def at_threshold(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Precision, recall and accuracy of the verdict score > threshold (NG is the positive class)."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) > threshold
    true_positive = int((predicted & labels).sum())
    return {
        "threshold": float(threshold),
        "precision": true_positive / max(int(predicted.sum()), 1),
        "recall": true_positive / max(int(labels.sum()), 1),
        "accuracy": float((predicted == labels).mean()),
        "false_positive_rate": int((predicted & ~labels).sum()) / max(int((~labels).sum()), 1),
    }


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, per-region overlap) at every distinct threshold, from the highest down.

    Each ground-truth region (a connected component of a mask) counts equally, whatever its size; the
    false-positive rate is over all pixels outside every region.
    """
    labels = np.zeros(masks.shape, dtype=np.int64)
    regions = 0
    for i, mask in enumerate(masks):
        labels[i], count = ndimage.label(mask)
        labels[i][labels[i] > 0] += regions
        regions += count
    labels, scores = labels.ravel(), maps.ravel()
    sizes = np.bincount(labels, minlength=regions + 1).astype(np.float64)
    negatives = sizes[0]
    weight = np.where(labels == 0, 0.0, 1.0 / (regions * sizes[labels]))
    order = np.argsort(-scores, kind="stable")
    scores, labels, weight = scores[order], labels[order], weight[order]
    fpr = np.cumsum(labels == 0) / negatives
    pro = np.cumsum(weight)
    last_of_tie = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    return np.r_[0.0, fpr[last_of_tie]], np.r_[0.0, pro[last_of_tie]]


def aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float | None:
    """Area under the PRO curve up to `fpr_limit`, normalised to [0, 1]; None without defect regions."""
    if not masks.any() or masks.all():
        return None
    fpr, pro = pro_curve(maps, masks)
    end = np.searchsorted(fpr, fpr_limit, side="right")
    fpr_cut = np.r_[fpr[:end], fpr_limit]
    pro_cut = np.r_[pro[:end], np.interp(fpr_limit, fpr, pro)]
    return float(np.trapezoid(pro_cut, fpr_cut) / fpr_limit)
