"""IVLP: independent deep prompts in the text and the vision branch."""
from __future__ import annotations

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError

from ._image_prompt import ImagePromptTrainer, add_common_keys, resolve_ctx_init
from ._prompt_layer import PromptLearner


def extend_cfg(cfg):
    cfg.TRAINER.IVLP = CN()
    # Text context tokens when CTX_INIT is empty (random initialization).
    cfg.TRAINER.IVLP.N_CTX_TEXT = 2
    # Words that initialize the text context; their token count sets the number of context tokens
    # (N_CTX_TEXT is then not used); "template" = the dataset template's leading words.
    cfg.TRAINER.IVLP.CTX_INIT = "a photo"
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

    def build_learner(self):
        t = self.tcfg
        if t.PROMPT_DEPTH_VISION > 0 and not self.image_encoder.supports_prompts:
            raise UserError(
                f"IVLP vision prompts need a ViT image tower (open_clip or timm); set TRAINER.IVLP.PROMPT_DEPTH_VISION 0 "
                f"for backbone {self.cfg.MODEL.BACKBONE.NAME}"
            )
        if t.PROMPT_DEPTH_VISION > self.image_encoder.num_layers:
            raise UserError(
                f"TRAINER.IVLP.PROMPT_DEPTH_VISION {t.PROMPT_DEPTH_VISION} exceeds the "
                f"{self.image_encoder.num_layers} layers of the image encoder"
            )
        text = PromptLearner(self.text_encoder, self.prompt_tokenizer, n_ctx=t.N_CTX_TEXT,
                             ctx_init=resolve_ctx_init(t.CTX_INIT, self.dataset_entry), depth=t.PROMPT_DEPTH_TEXT)
        self.tokens = text.tokens_for(self.classnames, self.dataset_entry.template).to(self.device)
        return IVLPLearner(text, t.N_CTX_VISION, t.PROMPT_DEPTH_VISION, self.image_encoder.width)

    def vision_prompts(self):
        return list(self.prompt_learner.vision)
