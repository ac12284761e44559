"""CLIP-Adapter: a residual bottleneck adapter on the frozen image feature, trained with cross-entropy
against the zero-shot text classifier."""
from __future__ import annotations

from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError
from core.utils import logger

from clipkit import feature_methods as fm
from .feature_based import FeatureTrainer, add_feature_keys


def extend_cfg(cfg):
    cfg.TRAINER.CLIPADAPTER = CN()
    # Blend ratio: the adapted feature is ALPHA * adapter(f) + (1 - ALPHA) * f.
    cfg.TRAINER.CLIPADAPTER.ALPHA = 0.5
    # Bottleneck reduction: the hidden layer has D / REDUCTION units.
    cfg.TRAINER.CLIPADAPTER.REDUCTION = 4
    # Training: SGD without momentum at OPTIM.LR, a cosine over all iterations, OPTIM.MAX_EPOCH epochs of
    # DATALOADER.TRAIN_X.BATCH_SIZE; epoch e reads augmented view e of every image (views = epochs).
    add_feature_keys(cfg.TRAINER.CLIPADAPTER)


@TRAINER_REGISTRY.register(name="CLIP-Adapter")
class CLIPAdapterTrainer(FeatureTrainer):
    cfg_key = "CLIPADAPTER"
    model_name = "adapter"
    trains_epochs = True

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if not 0 <= cfg.TRAINER.CLIPADAPTER.ALPHA <= 1:
            raise UserError(f"TRAINER.CLIPADAPTER.ALPHA must be between 0 and 1, not {cfg.TRAINER.CLIPADAPTER.ALPHA}")
        if cfg.TRAINER.CLIPADAPTER.REDUCTION < 1:
            raise UserError(f"TRAINER.CLIPADAPTER.REDUCTION must be 1 or more, not {cfg.TRAINER.CLIPADAPTER.REDUCTION}")

    def views_needed(self):
        return max(self.cfg.OPTIM.MAX_EPOCH, 1)

    def build_head(self, dim, n_classes, n_train):
        return fm.CLIPAdapter(dim, self.tcfg.REDUCTION, self.tcfg.ALPHA)

    def fit(self, views, labels, val):
        cfg = self.cfg
        losses = fm.train_clip_adapter(self.model, views, labels, self.text_features, self.logit_scale, cfg.OPTIM.LR,
                                       cfg.DATALOADER.TRAIN_X.BATCH_SIZE, self.generator, log=logger.info)
        self.run_info["train_loss"] = {"loss": losses[-1]}
        if val is not None:
            self.run_info["val_accuracy"] = fm.accuracy(self.logits(val[0]), val[1])

    def logits(self, feats):
        return fm.clip_adapter_logits(self.model, feats, self.text_features, self.logit_scale)
