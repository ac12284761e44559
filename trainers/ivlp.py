"""IVLP: independent deep prompts in the text and the vision branch."""
from __future__ import annotations

import torch
import torch.nn as nn
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError

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
    # Also train the backbone's whole image encoder / its text tower's token embedding, as the original
    # code's few-shot trainer does (recipe as_published_fewshot). Off everywhere else: prompts only.
    # The run's checkpoint then holds the fine-tuned weights too, and --model-dir evaluation uses them.
    cfg.TRAINER.IVLP.FINETUNE_IMAGE_ENCODER = False
    cfg.TRAINER.IVLP.FINETUNE_TOKEN_EMBEDDING = False
    add_common_keys(cfg.TRAINER.IVLP)


class IVLPLearner(nn.Module):
    """Text prompts (PromptLearner) and vision prompts: depth x (n_ctx_vision, vision width).

    ``finetuned``: {name: backbone module} trained along with the prompts (the image tower,
    the token embedding); registered here so that the optimizer and the checkpoint hold them.
    """

    def __init__(self, text_prompts, n_ctx_vision, depth_vision, vision_width, init_std=0.02, finetuned=None):
        super().__init__()
        self.text = text_prompts
        self.vision = nn.ParameterList(
            [nn.Parameter(torch.randn(n_ctx_vision, vision_width) * init_std) for _ in range(depth_vision)]
        )
        for name, module in (finetuned or {}).items():
            module.requires_grad_(True)
            self.add_module(name, module)


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
        finetuned = {}
        if self.finetuned_parts() and self.prec == "fp16":
            raise UserError("TRAINER.IVLP.FINETUNE_* trains backbone weights, which PREC fp16 keeps in half "
                            "precision; use PREC fp32 (or amp)")
        if t.FINETUNE_IMAGE_ENCODER:
            finetuned["image_tower"] = self.image_encoder.visual
        if t.FINETUNE_TOKEN_EMBEDDING:
            enc = self.text_encoder
            finetuned["token_embedding"] = enc.word_embeddings if enc.kind == "hf" else enc.token_embedding_module
        return IVLPLearner(text, t.N_CTX_VISION, t.PROMPT_DEPTH_VISION, self.image_encoder.width, finetuned=finetuned)

    def finetuned_parts(self):
        """Names of the backbone parts this run trains (empty: prompts only)."""
        t = self.tcfg
        return [name for name, on in (("image encoder", t.FINETUNE_IMAGE_ENCODER),
                                      ("token embedding", t.FINETUNE_TOKEN_EMBEDDING)) if on]

    def method_label(self):
        # Fine-tuning the backbone makes another method in tables.
        parts = self.finetuned_parts()
        label = super().method_label()
        return f"{label} (fine-tuned {' + '.join(parts)})" if parts else label

    @property
    def feature_cache(self):
        # Features stored per backbone would not be this run's once backbone weights train.
        return None if self.finetuned_parts() else super().feature_cache

    def tensor_settings(self):
        text, t = self.prompt_learner.text, self.tcfg
        settings = {"TRAINER.IVLP.N_CTX_TEXT": text.n_ctx, "TRAINER.IVLP.PROMPT_DEPTH_TEXT": text.depth,
                    "TRAINER.IVLP.N_CTX_VISION": t.N_CTX_VISION, "TRAINER.IVLP.PROMPT_DEPTH_VISION": t.PROMPT_DEPTH_VISION}
        # Recorded only when on, so that prompt-only checkpoints keep the settings they were saved with.
        for key in ("FINETUNE_IMAGE_ENCODER", "FINETUNE_TOKEN_EMBEDDING"):
            if t[key]:
                settings[f"TRAINER.IVLP.{key}"] = True
        return settings

    def vision_prompts(self):
        return list(self.prompt_learner.vision)
