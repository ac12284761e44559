"""CoCoOp: a meta-net turns each image's feature into a bias added to the shared context."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY

from .image_prompt import ImagePromptTrainer, add_common_keys


def extend_cfg(cfg):
    cfg.TRAINER.COCOOP = CN()
    # Context tokens when CTX_INIT is empty (random initialization).
    cfg.TRAINER.COCOOP.N_CTX = 4
    # Words that initialize the context; "template" = the dataset template's leading words.
    # The prompt is "{words} {class}." and its first <word count> tokens are the context
    # (N_CTX is then not used), as in the original CoCoOp.
    cfg.TRAINER.COCOOP.CTX_INIT = "a photo of a"
    add_common_keys(cfg.TRAINER.COCOOP)


class CoCoOpLearner(nn.Module):
    """Context (n_ctx, width) plus meta-net: image feature (D,) -> context bias (width,)."""

    def __init__(self, text_prompts, embed_dim):
        super().__init__()
        self.text = text_prompts
        width = text_prompts.ctx.shape[-1]
        self.meta_net = nn.Sequential(
            nn.Linear(embed_dim, max(embed_dim // 16, 1)), nn.ReLU(inplace=True),
            nn.Linear(max(embed_dim // 16, 1), width),
        )


@TRAINER_REGISTRY.register()
class CoCoOp(ImagePromptTrainer):
    cfg_key = "COCOOP"
    RECIPES = {"base2new": "vit_b16_c4_ep10_batch1_ctxv1", "fewshot": "vit_b16_c4_ep10_batch1_ctxv1"}

    def build_learner(self):
        text = self.build_text_prompts(self.tcfg.N_CTX, n_ctx_from_words=True)
        with torch.no_grad():  # the joint embedding size, whatever the text tower
            dim = self.text_encoder(self.text_encoder.embed(self.tokens.ids[:1]), self.tokens.ids[:1]).shape[-1]
        return CoCoOpLearner(text, dim)

    def tensor_settings(self):
        return {"TRAINER.COCOOP.N_CTX": self.prompt_learner.text.n_ctx}

    def logits(self, images):
        image_features = self.normalized_image_features(images)  # (B, D)
        bias = self.prompt_learner.meta_net(image_features.to(self.prompt_learner.text.ctx.dtype))  # (B, width)
        n_cls = len(self.tokens)
        batch = image_features.shape[0]
        # Every image gets its own prompts for all classes: rows (B * n_cls).
        tokens = self.tokens.select(torch.arange(n_cls, device=self.device).repeat(batch))
        text = self.prompt_learner.text(self.text_encoder, tokens, ctx_bias=bias.repeat_interleave(n_cls, dim=0))
        text = self.fuse(F.normalize(text.float(), dim=-1).view(batch, n_cls, -1))
        return self.logit_scale * torch.einsum("bd,bcd->bc", image_features, text)
