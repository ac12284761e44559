"""Tip-Adapter (training-free): a cache model whose keys are the few-shot image features and values their
one-hot labels, blended with the zero-shot logits; alpha and beta chosen by a grid search on validation."""
from __future__ import annotations

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError
from core.utils import logger

from clipkit import feature_methods as fm
from .feature_based import FeatureTrainer, add_feature_keys


def add_tip_keys(node):
    # Sharpness beta and weight alpha of the cache logits before the search (and without validation images).
    node.INIT_BETA = 1.0
    node.INIT_ALPHA = 1.0
    # Search grids on the validation features: SEARCH_STEP[i] values from 0.1 in steps of
    # (SEARCH_SCALE[i] - 0.1) / SEARCH_STEP[i]; index 0 is beta, 1 is alpha.
    node.SEARCH_SCALE = [50.0, 50.0]
    node.SEARCH_STEP = [200, 200]
    # The cache keys are the mean of each image's first AUGMENT_VIEWS augmented views, normalized.
    add_feature_keys(node)


def extend_cfg(cfg):
    cfg.TRAINER.TIPADAPTER = CN()
    add_tip_keys(cfg.TRAINER.TIPADAPTER)


class TipCache(nn.Module):
    """Keys (NK, D), one-hot values (NK, C), and the chosen beta and alpha (saved with the checkpoint)."""

    def __init__(self, n_keys, dim, n_classes):
        super().__init__()
        self.keys = nn.Parameter(torch.zeros(n_keys, dim))
        self.values = nn.Parameter(torch.zeros(n_keys, n_classes))
        self.beta = nn.Parameter(torch.tensor(1.0))
        self.alpha = nn.Parameter(torch.tensor(1.0))


class TipAdapterBase(FeatureTrainer):
    model_name = "cache"

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        t = cfg.TRAINER[self.cfg_key]
        if len(t.SEARCH_SCALE) != 2 or len(t.SEARCH_STEP) != 2 or min(t.SEARCH_STEP) < 1:
            raise UserError(f"TRAINER.{self.cfg_key}.SEARCH_SCALE and SEARCH_STEP need two values each (beta, alpha), "
                            f"steps 1 or more; got {list(t.SEARCH_SCALE)} and {list(t.SEARCH_STEP)}")

    def build_head(self, dim, n_classes, n_train):
        return TipCache(n_train, dim, n_classes)

    def build_cache(self, views, labels):
        keys, values = fm.cache_model(views[:self.tcfg.AUGMENT_VIEWS], labels, len(self.classnames))
        with torch.no_grad():
            self.model.keys.copy_(keys)
            self.model.values.copy_(values)
            self.model.beta.fill_(self.tcfg.INIT_BETA)
            self.model.alpha.fill_(self.tcfg.INIT_ALPHA)

    def search(self, val):
        """Set beta and alpha from the grid search on the validation features (kept as they are without them)."""
        m, t = self.model, self.tcfg
        if val is None:
            logger.info("no validation images: beta and alpha stay at their initial values")
            return
        with torch.no_grad():
            before = fm.accuracy(self.logits(val[0]), val[1])
            betas, alphas = fm.search_grid(t.SEARCH_SCALE[0], t.SEARCH_STEP[0]), fm.search_grid(t.SEARCH_SCALE[1], t.SEARCH_STEP[1])
            beta, alpha, acc = fm.tip_search(val[0], val[1], m.keys, m.values, self.text_features, self.logit_scale,
                                             betas, alphas)
            m.beta.fill_(beta)
            m.alpha.fill_(alpha)
        logger.info(f"search on {len(val[1])} validation images: beta {beta:.4f}, alpha {alpha:.4f}, "
                    f"val accuracy {acc:.2f} (at the initial values {before:.2f})")
        self.run_info["search"] = {"beta": beta, "alpha": alpha, "val_accuracy": acc, "val_accuracy_initial": before}

    def logits(self, feats):
        m = self.model
        return fm.tip_logits(feats, m.keys, m.values, self.text_features, m.alpha, m.beta, self.logit_scale)


@TRAINER_REGISTRY.register(name="Tip-Adapter")
class TipAdapter(TipAdapterBase):
    cfg_key = "TIPADAPTER"

    def fit(self, views, labels, val):
        self.build_cache(views, labels)
        self.search(val)
