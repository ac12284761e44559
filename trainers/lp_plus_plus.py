"""LP++: a linear classifier plus class-wise multiples of the zero-shot text logits, learned by
block-coordinate gradient steps with LP++'s data-driven step sizes."""
from __future__ import annotations

import torch
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError
from core.utils import logger

from clipkit import feature_methods as fm
from .feature_based import FeatureTrainer, add_feature_keys


def extend_cfg(cfg):
    cfg.TRAINER.LPPP = CN()
    # Full-batch iterations on the visual prototypes W and bias b (SGD with MOMENTUM at 4N / lambda_max(F^T F)).
    cfg.TRAINER.LPPP.ITERATIONS = 300
    cfg.TRAINER.LPPP.MOMENTUM = 0.9
    # The blending multipliers alpha take one gradient step every ALPHA_EVERY iterations
    # (step N / (4 max_c sum_n (f_n . w_c)^2)).
    cfg.TRAINER.LPPP.ALPHA_EVERY = 10
    # Features of AUGMENT_VIEWS augmented views per training image, each a training sample.
    add_feature_keys(cfg.TRAINER.LPPP)


@TRAINER_REGISTRY.register(name="LP++")
class LPPlusPlus(FeatureTrainer):
    cfg_key = "LPPP"
    model_name = "classifier"

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        t = cfg.TRAINER.LPPP
        if t.ITERATIONS < 1 or t.ALPHA_EVERY < 1:
            raise UserError(f"TRAINER.LPPP.ITERATIONS and ALPHA_EVERY must be 1 or more, not {t.ITERATIONS} and {t.ALPHA_EVERY}")

    def build_head(self, dim, n_classes, n_train):
        zeros = torch.zeros(n_classes, dim)
        return fm.LPPClassifier(zeros, torch.zeros(n_classes), torch.zeros(n_classes))

    def fit(self, views, labels, val):
        t = self.tcfg
        feats = views.reshape(-1, views.shape[-1])
        labels = labels.repeat(views.shape[0])
        n_classes = len(self.classnames)
        if labels.unique().numel() < n_classes:
            raise UserError(f"the few-shot training images cover {labels.unique().numel()} of {n_classes} classes; "
                            f"LP++ needs images of every class")
        init = fm.lpp_classifier(feats, labels, self.text_features, n_classes, self.generator)
        with torch.no_grad():
            for name, p in init.named_parameters():
                getattr(self.model, name).copy_(p)
        lr_w, lr_alpha, best = fm.train_lpp(self.model, feats, labels, self.text_features, t.ITERATIONS, t.ALPHA_EVERY,
                                            val=val, momentum=t.MOMENTUM, log=logger.info)
        logger.info(f"LP++ step sizes: lr_w {lr_w:.4g}, lr_alpha {lr_alpha:.4g}; kept iteration {best + 1}")
        self.run_info["lpp"] = {"lr_w": lr_w, "lr_alpha": lr_alpha, "init_alpha": init.alpha[0].item(),
                                "best_iteration": best + 1}

    def logits(self, feats):
        return self.model(feats, self.text_features)
