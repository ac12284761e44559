"""LP: L2-regularized logistic regression on normalized image features, the regularization chosen on
validation by CLIP's linear-probe search."""
from __future__ import annotations

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError
from core.utils import logger

from clipkit import feature_methods as fm
from .feature_based import FeatureTrainer, add_feature_keys


def extend_cfg(cfg):
    cfg.TRAINER.LP = CN()
    # Inverse regularization strengths of the coarse search (sklearn's C), best on validation first.
    cfg.TRAINER.LP.C_GRID = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]
    # Rounds of the binary search in log10(C) on [C*/10, 10 C*] after the coarse search.
    cfg.TRAINER.LP.SEARCH_STEPS = 8
    # Features of AUGMENT_VIEWS augmented views per training image, each a training sample.
    add_feature_keys(cfg.TRAINER.LP)


class LinearHead(nn.Module):
    """The fitted classifier as tensors: logits = f W^T + b; W (C, D), b (C,)."""

    def __init__(self, dim, n_classes):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n_classes, dim))
        self.bias = nn.Parameter(torch.zeros(n_classes))

    def forward(self, feats):
        return feats @ self.weight.t() + self.bias


@TRAINER_REGISTRY.register(name="LP")
class LinearProbe(FeatureTrainer):
    cfg_key = "LP"
    model_name = "classifier"

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if not cfg.TRAINER.LP.C_GRID or min(cfg.TRAINER.LP.C_GRID) <= 0:
            raise UserError(f"TRAINER.LP.C_GRID needs positive values, not {list(cfg.TRAINER.LP.C_GRID)}")
        if cfg.TRAINER.LP.SEARCH_STEPS < 0:
            raise UserError(f"TRAINER.LP.SEARCH_STEPS must be 0 or more, not {cfg.TRAINER.LP.SEARCH_STEPS}")

    def build_head(self, dim, n_classes, n_train):
        return LinearHead(dim, n_classes)

    def fit(self, views, labels, val):
        feats = views.reshape(-1, views.shape[-1])
        labels = labels.repeat(views.shape[0])
        if labels.unique().numel() < 2:
            raise UserError("the linear probe needs training images of at least two classes")
        if val is None:
            c = 1.0
            clf = fm.fit_logistic(feats, labels, c)
            logger.info("no validation images: C = 1 without search")
        else:
            c, clf, history = fm.lp_search(feats, labels, val[0], val[1], tuple(self.tcfg.C_GRID), self.tcfg.SEARCH_STEPS)
            logger.info(f"regularization search on {len(val[1])} validation images: C = {c:.4g} "
                        f"(val accuracy {history[-1][1] if history else float('nan'):.2f}; {len(history)} fits)")
            self.run_info["search"] = {"C": c, "fits": [[cc, a] for cc, a in history]}
        weight, bias = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
        if weight.shape[0] == 1:  # two classes: sklearn keeps only class 1's score; split it symmetrically
            weight, bias = torch.cat([-weight, weight]) / 2, torch.cat([-bias, bias]) / 2
        if weight.shape[0] != len(self.classnames):
            raise UserError(f"the few-shot training images cover {weight.shape[0]} of {len(self.classnames)} classes; "
                            f"the linear probe needs images of every class")
        with torch.no_grad():
            self.model.weight.copy_(weight)
            self.model.bias.copy_(bias)

    def logits(self, feats):
        return self.model(feats)
