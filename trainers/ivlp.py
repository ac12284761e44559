"""IVLP: independent deep prompts in the text and the vision branch."""
from __future__ import annotations

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY

from .image_prompt import ImagePromptTrainer, add_common_keys


def extend_cfg(cfg):
    cfg.TRAINER.IVLP = CN()
    # Text context tokens: the first N_CTX_TEXT tokens of the prompt.
    cfg.TRAINER.IVLP.N_CTX_TEXT = 2
    # Words that initialize the text context; "template" = the dataset template's leading words;
    # empty = random. The prompt is "{words} {class}." with its first N_CTX_TEXT tokens learnable
    # and the rest fixed; N_CTX_TEXT above the words' token count means random context.
    cfg.TRAINER.IVLP.CTX_INIT = "a photo of a"
    # Visual prompt tokens appended to the patch tokens.
    cfg.TRAINER.IVLP.N_CTX_VISION = 2
    # Layers with prompts in each branch (1 = input only).
    cfg.TRAINER.IVLP.PROMPT_DEPTH_TEXT = 9
    cfg.TRAINER.IVLP.PROMPT_DEPTH_VISION = 9
    add_common_keys(cfg.TRAINER.IVLP)


class IVLPLearner(nn.Module):
    """Text prompts (PromptLearner) and vision prompts: depth x (n_ctx_vision, vision width)."""

    def __init__(self, text_prompts, n_ctx_vision, depth_vision, vision_width, init_std=0.02):
        super().__init__()
        self.text = text_prompts
        self.vision = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx_vision, vision_width) * init_std) for _ in range(depth_vision)]
        )


@TRAINER_REGISTRY.register()
class IVLP(ImagePromptTrainer):
    cfg_key = "IVLP"
    RECIPES = {"base2new": "vit_b16_c2_ep5_batch4_2+2ctx", "fewshot": "vit_b16_c2_ep5_batch4_2+2ctx",
               "stacked": "medpromptclip_fewshot"}
    DEMO_RECIPES = {"stacked": "demo_stacked", "default": "demo"}
    # The paper's few-shot rows: IVLP started from MedPromptCLIP prompts.
    DEFAULT_IN = ("stacked",)
    PROMPT_SHAPE_KEYS = ("IVLP", "N_CTX_TEXT", "PROMPT_DEPTH_TEXT")

    def build_learner(self):
        t = self.tcfg
        if t.PROMPT_DEPTH_VISION > 0:
            self.require_visual_prompts(t.PROMPT_DEPTH_VISION, "TRAINER.IVLP.PROMPT_DEPTH_VISION")
        text = self.build_text_prompts(t.N_CTX_TEXT, depth=t.PROMPT_DEPTH_TEXT)
        return IVLPLearner(text, t.N_CTX_VISION, t.PROMPT_DEPTH_VISION, self.image_encoder.width)

    def tensor_settings(self):
        text, t = self.prompt_learner.text, self.tcfg
        return {"TRAINER.IVLP.N_CTX_TEXT": text.n_ctx, "TRAINER.IVLP.PROMPT_DEPTH_TEXT": text.depth,
                "TRAINER.IVLP.N_CTX_VISION": t.N_CTX_VISION, "TRAINER.IVLP.PROMPT_DEPTH_VISION": t.PROMPT_DEPTH_VISION}

    def vision_prompts(self):
        return list(self.prompt_learner.vision)
