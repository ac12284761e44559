"""KgCoOp (Yao et al., CVPR 2023): CoOp whose learned class text features are kept near the hand-crafted ones.

    loss = CE(logits, y) + W * mean_c || t_c - t0_c ||^2

t_c: the normalized text feature of class c's learned prompt; t0_c: the frozen backbone's normalized
feature of the dataset's hand-crafted prompt (its template, e.g. "a photo of a {class}."). The published
code writes the distance as 1 - cos(t_c, t0_c), half the squared distance between unit vectors, so its
W equals 2 x the W here; the recipes carry the published values halved (the same objective).
"""
from __future__ import annotations

import torch.nn.functional as F
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.utils import logger
from datasets.catalog import readable_classname

from .coop import CoOp
from .image_prompt import add_common_keys


def extend_cfg(cfg):
    cfg.TRAINER.KGCOOP = CN()
    # Context tokens when CTX_INIT is empty (random initialization).
    cfg.TRAINER.KGCOOP.N_CTX = 4
    # Words that initialize the context (their word count is the context size, as in CoOp);
    # "template" = the dataset template's leading words; empty = random.
    cfg.TRAINER.KGCOOP.CTX_INIT = "a photo of a"
    # Class-specific context (one context per class) instead of one shared context.
    cfg.TRAINER.KGCOOP.CSC = False
    # Where the class name sits: end, middle or front.
    cfg.TRAINER.KGCOOP.CLASS_TOKEN_POSITION = "end"
    # Weight of the squared distance between learned and hand-crafted class text features.
    cfg.TRAINER.KGCOOP.W = 4.0
    add_common_keys(cfg.TRAINER.KGCOOP)


def squared_distance(text_features, anchor):
    """mean_c ||t_c - t0_c||^2 of normalized (n_cls, D) features."""
    return (text_features - anchor).pow(2).sum(dim=-1).mean()


@TRAINER_REGISTRY.register()
class KgCoOp(CoOp):
    cfg_key = "KGCOOP"
    RECIPES = {"base2new": "base2new", "fewshot": "fewshot"}
    RECIPES_BY_SHOTS = {}
    DEMO_RECIPES = {"default": "demo"}
    DEFAULT_IN = ()
    PROMPT_SHAPE_KEYS = ("KGCOOP", "N_CTX", None)

    def build_model(self):
        super().build_model()
        template = self.dataset_entry.template
        texts = [template.format(readable_classname(c)) for c in self.classnames]
        logger.info(f"KgCoOp anchor: hand-crafted prompts, e.g. '{texts[0]}'")
        self.anchor = self.encode_texts(texts)

    def tensor_settings(self):
        text = self.prompt_learner
        return {"TRAINER.KGCOOP.N_CTX": text.n_ctx, "TRAINER.KGCOOP.CSC": text.class_specific,
                "TRAINER.KGCOOP.CLASS_TOKEN_POSITION": text.position}

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            image_features = self.normalized_image_features(images)
            text_features = self.class_text_features()
            logits = self.logit_scale * image_features @ text_features.t()
        ce = F.cross_entropy(logits.float(), labels)
        kg = squared_distance(text_features.float(), self.anchor.float())
        loss = ce + self.tcfg.W * kg
        self.step_with_scaler(loss)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        acc = (logits.argmax(dim=1) == labels).float().mean().item() * 100
        return {"loss": loss.item(), "ce": ce.item(), "kg": kg.item(), "acc": acc}
