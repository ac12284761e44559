"""MaPLe: deep text prompts coupled to vision prompts through per-layer linear maps."""
from __future__ import annotations

import copy

import torch.nn as nn
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY

from .image_prompt import ImagePromptTrainer, add_common_keys


def extend_cfg(cfg):
    cfg.TRAINER.MAPLE = CN()
    # Context tokens: the first N_CTX tokens of the prompt.
    cfg.TRAINER.MAPLE.N_CTX = 2
    # Words that initialize the context; "template" = the dataset template's leading words;
    # empty = random. The prompt is "{words} {class}." with its first N_CTX tokens learnable
    # and the rest fixed; N_CTX above the words' token count means random context.
    cfg.TRAINER.MAPLE.CTX_INIT = "a photo of a"
    # Layers with coupled prompts in both branches (1 = input only).
    cfg.TRAINER.MAPLE.PROMPT_DEPTH = 9
    add_common_keys(cfg.TRAINER.MAPLE)


class MaPLeLearner(nn.Module):
    """Text prompts and one linear map (text width -> vision width) per prompted layer.

    As in the original MaPLe, the first layer's map is initialized on its own and the
    maps of layers 2..depth start as identical copies of one randomly initialized layer.
    """

    def __init__(self, text_prompts, vision_width):
        super().__init__()
        self.text = text_prompts
        text_width = text_prompts.ctx.shape[-1]
        first = nn.Linear(text_width, vision_width)
        deeper = nn.Linear(text_width, vision_width)
        self.couplers = nn.ModuleList([first] + [copy.deepcopy(deeper) for _ in range(text_prompts.depth - 1)])

    def vision_prompts(self):
        """Vision prompts for layers 1..depth: each (n_ctx, vision width)."""
        text_prompts = [self.text.ctx] + list(self.text.deep_ctx)
        return [coupler(p) for coupler, p in zip(self.couplers, text_prompts)]


@TRAINER_REGISTRY.register()
class MaPLe(ImagePromptTrainer):
    cfg_key = "MAPLE"
    RECIPES = {"base2new": "vit_b16_c2_ep5_batch4_2ctx", "fewshot": "vit_b16_c2_ep5_batch4_2ctx", "stacked": "stacked"}
    DEFAULT_IN = ("base2new", "fewshot")
    PROMPT_SHAPE_KEYS = ("MAPLE", "N_CTX", "PROMPT_DEPTH")

    def build_learner(self):
        t = self.tcfg
        # Text depth is checked by the PromptLearner; vision depth here.
        self.require_visual_prompts(t.PROMPT_DEPTH, "TRAINER.MAPLE.PROMPT_DEPTH")
        return MaPLeLearner(self.build_text_prompts(t.N_CTX, depth=t.PROMPT_DEPTH), self.image_encoder.width)

    def tensor_settings(self):
        return {"TRAINER.MAPLE.N_CTX": self.prompt_learner.text.n_ctx,
                "TRAINER.MAPLE.PROMPT_DEPTH": self.prompt_learner.text.depth}

    def vision_prompts(self):
        return self.prompt_learner.vision_prompts()
