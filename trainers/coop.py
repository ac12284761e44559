"""CoOp: learnable context (shared or class-specific) before, around or after the class name."""
from __future__ import annotations

from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY

from .image_prompt import ImagePromptTrainer, add_common_keys


def extend_cfg(cfg):
    cfg.TRAINER.COOP = CN()
    # Context tokens when CTX_INIT is empty (random initialization).
    cfg.TRAINER.COOP.N_CTX = 16
    # Words that initialize the context; "template" = the dataset template's leading words;
    # empty = random. The prompt is "{words} {class}." and its first <word count> tokens are
    # the context (N_CTX is then not used), as in the original CoOp.
    cfg.TRAINER.COOP.CTX_INIT = ""
    # Class-specific context (one context per class) instead of one shared context.
    cfg.TRAINER.COOP.CSC = False
    # Where the class name sits: end, middle or front.
    cfg.TRAINER.COOP.CLASS_TOKEN_POSITION = "end"
    add_common_keys(cfg.TRAINER.COOP)


@TRAINER_REGISTRY.register()
class CoOp(ImagePromptTrainer):
    cfg_key = "COOP"
    RECIPES = {"base2new": "vit_b16_ep50_ctxv1", "fewshot": "vit_b16", "stacked": "stacked"}
    # CoOp's paper: 50 epochs for 1 shot, 100 for 2 and 4 shots (vit_b16's 200 for 8 and 16).
    RECIPES_BY_SHOTS = {"fewshot": {1: "vit_b16_ep50", 2: "vit_b16_ep100", 4: "vit_b16_ep100"}}
    DEFAULT_IN = ("base2new", "fewshot")
    PROMPT_SHAPE_KEYS = ("COOP", "N_CTX", None)
    uses_frozen_image_features = True

    def build_learner(self):
        t = self.tcfg
        return self.build_text_prompts(t.N_CTX, class_specific=t.CSC, n_cls=len(self.classnames),
                                       position=t.CLASS_TOKEN_POSITION, n_ctx_from_words=True)

    def tensor_settings(self):
        text = self.prompt_learner
        return {"TRAINER.COOP.N_CTX": text.n_ctx, "TRAINER.COOP.CSC": text.class_specific,
                "TRAINER.COOP.CLASS_TOKEN_POSITION": text.position}
