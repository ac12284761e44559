"""Classification evaluator: accuracy, macro-F1, per-class accuracy, confusion matrix."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from .registry import Registry
from .utils import logger

EVALUATOR_REGISTRY = Registry("evaluator")


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


@EVALUATOR_REGISTRY.register()
class Classification(EvaluatorBase):
    """Collects predictions batch by batch; ``evaluate`` returns the metrics (percentages)."""

    def __init__(self, cfg, lab2cname=None, **kwargs):
        super().__init__(cfg, lab2cname)
        self.num_classes = len(self._lab2cname) if lab2cname else None
        self.reset()

    def reset(self):
        self._y_true = []
        self._y_pred = []
        self.cmat = None
        self.per_class_accuracy = None

    def process(self, mo, gt):
        """mo: logits (batch, n_classes); gt: labels (batch,)."""
        self._y_pred.extend(mo.argmax(dim=1).tolist())
        self._y_true.extend(gt.tolist() if torch.is_tensor(gt) else list(gt))

    def evaluate(self):
        y_true = np.asarray(self._y_true, dtype=np.int64)
        y_pred = np.asarray(self._y_pred, dtype=np.int64)
        n = self.num_classes or int(max(y_true.max(initial=-1), y_pred.max(initial=-1)) + 1)
        cmat = np.zeros((n, n), dtype=np.int64)
        np.add.at(cmat, (y_true, y_pred), 1)
        total = len(y_true)
        correct = int(np.trace(cmat))
        support = cmat.sum(axis=1)
        predicted = cmat.sum(axis=0)
        tp = np.diag(cmat).astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            precision = np.where(predicted > 0, tp / np.maximum(predicted, 1), 0.0)
            recall = np.where(support > 0, tp / np.maximum(support, 1), 0.0)
            f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        present = support > 0
        results = OrderedDict()
        results["accuracy"] = 100.0 * correct / max(total, 1)
        results["error_rate"] = 100.0 - results["accuracy"]
        # Macro-F1 over the classes that occur in the evaluated split (as scikit-learn does
        # over the union of true and predicted labels).
        considered = present | (predicted > 0)
        results["macro_f1"] = 100.0 * float(f1[considered].mean()) if considered.any() else 0.0
        results["num_samples"] = total
        self.cmat = cmat
        self.per_class_accuracy = {
            self._lab2cname.get(i, str(i)): 100.0 * float(recall[i]) for i in range(n) if present[i]
        }
        logger.info(
            f"=> result: #samples {total}, #correct {correct}, accuracy {results['accuracy']:.2f}%, "
            f"macro_f1 {results['macro_f1']:.2f}%"
        )
        if self.cfg.TEST.PER_CLASS_RESULT:
            results["per_class_accuracy"] = self.per_class_accuracy
            for name, acc in self.per_class_accuracy.items():
                logger.info(f"* class: {name}, accuracy {acc:.1f}%")
        return results


def build_evaluator(cfg, **kwargs):
    return EVALUATOR_REGISTRY.get(cfg.TEST.EVALUATOR)(cfg, **kwargs)
