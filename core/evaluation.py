"""Classification evaluator: the paper's metrics from logits and labels.

Every metric is in percent (kappa too: Cohen's kappa x 100). Macro averages (F1, AUC, specificity)
run over the classes that have at least one image in the evaluated split, as the original
evaluator does (scikit-learn's ``labels=np.unique(y_true)``): a class without test images has no
recall, no positives for an ROC curve and would only add an undefined or zero term. Predictions
into such a class still count as errors for the true class (recall, accuracy, kappa). Macro-AUC needs
two classes with images; with fewer it is None. AUC is one-vs-rest on the softmax of the logits
over all evaluated classes; ECE is the expected calibration error of the top-class softmax
confidence in 15 equal-width bins.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .registry import Registry
from .utils import logger

EVALUATOR_REGISTRY = Registry("evaluator")
# Metrics every evaluation stores (results.json keys), in the order tables offer them.
METRICS = ("accuracy", "macro_f1", "kappa", "auc", "specificity", "ece")
ECE_BINS = 15


class EvaluatorBase:
    def __init__(self, cfg, lab2cname=None, **kwargs):
        self.cfg = cfg
        self._lab2cname = lab2cname or {}

    def reset(self):
        raise NotImplementedError

    def process(self, mo, gt):
        raise NotImplementedError

    def evaluate(self):
        raise NotImplementedError


def binary_auc(positive, scores):
    """Area under the ROC curve of ``scores`` for the boolean ``positive`` (ties count one half)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U from average ranks.
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts):
        ranks[order[start:start + count]] = start + (count + 1) / 2.0
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def expected_calibration_error(confidence, correct, n_bins=ECE_BINS):
    """Sum over equal-width confidence bins (lower edge open, upper closed) of |accuracy - confidence|
    weighted by the bin's share of the images; a fraction in [0, 1]."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return 0.0
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def cohen_kappa(cmat):
    """Cohen's kappa (unweighted) of a confusion matrix; 0 when chance agreement is total."""
    total = cmat.sum()
    if total == 0:
        return 0.0
    observed = np.trace(cmat) / total
    expected = float((cmat.sum(axis=0) * cmat.sum(axis=1)).sum()) / total ** 2
    return float((observed - expected) / (1 - expected)) if expected < 1 else 0.0


def _pct(value):
    return None if value is None else 100.0 * float(value)


@EVALUATOR_REGISTRY.register()
class Classification(EvaluatorBase):
    """Collects logits batch by batch; ``evaluate`` returns the metrics (percentages, see the module doc)."""

    def __init__(self, cfg, lab2cname=None, **kwargs):
        super().__init__(cfg, lab2cname)
        self.num_classes = len(self._lab2cname) if lab2cname else None
        self.reset()

    def reset(self):
        self._y_true = []
        self._probs = []
        self.cmat = None
        self.per_class_accuracy = None

    def process(self, mo, gt):
        """mo: logits (batch, n_classes); gt: labels (batch,)."""
        self._probs.append(torch.softmax(mo.detach().double(), dim=1).cpu().numpy())
        self._y_true.extend(gt.tolist() if torch.is_tensor(gt) else list(gt))

    def evaluate(self):
        y_true = np.asarray(self._y_true, dtype=np.int64)
        probs = np.concatenate(self._probs) if self._probs else np.zeros((0, self.num_classes or 0))
        y_pred = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        n = self.num_classes or int(max(y_true.max(initial=-1), y_pred.max(initial=-1), probs.shape[1] - 1) + 1)
        cmat = np.zeros((n, n), dtype=np.int64)
        np.add.at(cmat, (y_true, y_pred), 1)
        total = len(y_true)
        correct = int(np.trace(cmat))
        support = cmat.sum(axis=1)
        predicted = cmat.sum(axis=0)
        tp = np.diag(cmat).astype(np.float64)
        fp = predicted - tp
        tn = total - support - fp
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
        recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-300), 0.0)
        negatives = total - support
        specificity = np.where(negatives > 0, tn / np.maximum(negatives, 1), 0.0)
        present = support > 0
        auc = [binary_auc(y_true == c, probs[:, c]) if present[c] and c < probs.shape[1] else None for c in range(n)]
        aucs = [a for c, a in enumerate(auc) if present[c] and a is not None]
        confidence = probs.max(axis=1) if len(probs) else np.zeros(0)

        results = OrderedDict()
        results["accuracy"] = 100.0 * correct / max(total, 1)
        results["error_rate"] = 100.0 - results["accuracy"]
        results["macro_f1"] = 100.0 * float(f1[present].mean()) if present.any() else 0.0
        results["kappa"] = 100.0 * cohen_kappa(cmat)
        results["auc"] = 100.0 * float(np.mean(aucs)) if present.sum() >= 2 and aucs else None
        results["specificity"] = 100.0 * float(specificity[present].mean()) if present.any() else 0.0
        results["ece"] = 100.0 * expected_calibration_error(confidence, y_pred == y_true)
        results["num_samples"] = total
        results["classes_without_images"] = [self._lab2cname.get(c, str(c)) for c in range(n) if not present[c]]
        results["per_class"] = OrderedDict(
            (self._lab2cname.get(c, str(c)), {
                "support": int(support[c]),
                "accuracy": _pct(recall[c]) if present[c] else None,
                "f1": _pct(f1[c]) if present[c] else None,
                "auc": _pct(auc[c]),
                "specificity": _pct(specificity[c]) if present[c] and negatives[c] > 0 else None,
            }) for c in range(n))
        results["confusion_matrix"] = cmat.tolist()
        self.cmat = cmat
        self.per_class_accuracy = {
            self._lab2cname.get(i, str(i)): 100.0 * float(recall[i]) for i in range(n) if present[i]
        }
        auc_text = "-" if results["auc"] is None else f"{results['auc']:.2f}%"
        logger.info(
            f"=> result: #samples {total}, #correct {correct}, accuracy {results['accuracy']:.2f}%, "
            f"macro_f1 {results['macro_f1']:.2f}%, kappa {results['kappa']:.2f}%, auc {auc_text}, "
            f"specificity {results['specificity']:.2f}%, ece {results['ece']:.2f}%"
        )
        if results["classes_without_images"]:
            logger.info(f"classes without images in this split (left out of the macro averages): "
                        f"{', '.join(results['classes_without_images'])}")
        if self.cfg.TEST.PER_CLASS_RESULT:
            results["per_class_accuracy"] = self.per_class_accuracy
            for name, acc in self.per_class_accuracy.items():
                logger.info(f"* class: {name}, accuracy {acc:.1f}%")
        return results


def build_evaluator(cfg, **kwargs):
    return EVALUATOR_REGISTRY.get(cfg.TEST.EVALUATOR)(cfg, **kwargs)
