"""Tip-Adapter-F: Tip-Adapter with the cache keys fine-tuned on the augmented few-shot features, then
beta and alpha searched on validation, as in Tip-Adapter's paper."""
from __future__ import annotations

from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.utils import logger

from clipkit import feature_methods as fm
from .tip_adapter import TipAdapterBase, add_tip_keys


def extend_cfg(cfg):
    cfg.TRAINER.TIPADAPTERF = CN()
    add_tip_keys(cfg.TRAINER.TIPADAPTERF)
    # AdamW's eps and weight decay for the keys; its learning rate is OPTIM.LR, with a cosine over all
    # iterations of OPTIM.MAX_EPOCH epochs of DATALOADER.TRAIN_X.BATCH_SIZE (epoch e reads view e).
    cfg.TRAINER.TIPADAPTERF.ADAMW_EPS = 1e-4
    cfg.TRAINER.TIPADAPTERF.WEIGHT_DECAY = 0.01


@TRAINER_REGISTRY.register(name="Tip-Adapter-F")
class TipAdapterF(TipAdapterBase):
    cfg_key = "TIPADAPTERF"
    trains_epochs = True

    def views_needed(self):
        return max(self.tcfg.AUGMENT_VIEWS, self.cfg.OPTIM.MAX_EPOCH, 1)

    def fit(self, views, labels, val):
        cfg, t, m = self.cfg, self.tcfg, self.model
        self.build_cache(views, labels)
        # Fine-tune at the initial beta and alpha; the epoch with the best validation accuracy is kept.
        history = fm.train_tip_f(m.keys, views[:max(cfg.OPTIM.MAX_EPOCH, 1)], labels, m.values.detach(),
                                 self.text_features, t.INIT_ALPHA, t.INIT_BETA, self.logit_scale, cfg.OPTIM.LR,
                                 cfg.DATALOADER.TRAIN_X.BATCH_SIZE, self.generator, val=val, eps=t.ADAMW_EPS,
                                 weight_decay=t.WEIGHT_DECAY, log=logger.info)
        if history:
            best = max(range(len(history)), key=lambda i: (history[i], -i))
            self.run_info["finetune"] = {"best_epoch": best + 1, "val_accuracy": history[best]}
        self.search(val)
