"""Zero-shot CLIP: class text features from a template, a template ensemble or LLM descriptions."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError
from core.utils import logger
from datasets.catalog import readable_classname

from .base import CLIPTrainer
from clipkit.descriptions import descriptions_path, descriptions_source, file_record, load_descriptions

PROMPT_MODES = ("template", "ensemble", "descriptions", "imagenet80")
# The method label of each mode in tables.
MODE_LABELS = {"template": "template", "ensemble": "ensemble", "descriptions": "descriptions",
               "imagenet80": "80+1 templates"}


def extend_cfg(cfg):
    cfg.TRAINER.ZEROSHOTCLIP = CN()
    # How class prompts are made: template (the dataset's modality template), ensemble
    # (the modality template plus TEMPLATES, features averaged) or descriptions
    # (llm_descriptions/<dataset>.json, features averaged per class) or imagenet80 (the 80 ImageNet
    # templates of CLIP's prompt-engineering notebook plus the modality template, features averaged:
    # the original code's zero-shot reference).
    cfg.TRAINER.ZEROSHOTCLIP.PROMPT = "template"
    # Extra templates for the ensemble; "{}" is the class name.
    cfg.TRAINER.ZEROSHOTCLIP.TEMPLATES = [
        "a photo of {}.", "an image of {}.", "a medical image of {}.", "a medical image showing {}.", "{}.",
    ]
    # Precision: fp32, amp (autocast) or fp16 (half weights, CUDA only).
    cfg.TRAINER.ZEROSHOTCLIP.PREC = "fp32"


def mean_features(feats, groups):
    """Mean of each group's rows of ``feats`` (n, D), renormalized: (n_groups, D)."""
    out, i = [], 0
    for g in groups:
        out.append(F.normalize(feats[i:i + len(g)].mean(0), dim=-1))
        i += len(g)
    return torch.stack(out)


@TRAINER_REGISTRY.register()
class ZeroShotCLIP(CLIPTrainer):
    cfg_key = "ZEROSHOTCLIP"
    KIND = "zero-shot"
    RECIPES = {"base2new": "template", "fewshot": "template", "crossmodal": "template", "zeroshot": "template"}
    DEFAULT_IN = ("base2new", "fewshot", "crossmodal", "zeroshot")
    uses_frozen_image_features = True

    @classmethod
    def descriptions_read(cls, cfg, eval_only):
        return [cfg.DATASET.NAME] if cfg.TRAINER.ZEROSHOTCLIP.PROMPT == "descriptions" else []

    def method_label(self):
        return f"ZeroShotCLIP ({MODE_LABELS[self.tcfg.PROMPT]})"

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if cfg.TRAINER.ZEROSHOTCLIP.PROMPT not in PROMPT_MODES:
            raise UserError(
                f"TRAINER.ZEROSHOTCLIP.PROMPT must be one of {', '.join(PROMPT_MODES)}, not '{cfg.TRAINER.ZEROSHOTCLIP.PROMPT}'"
            )

    def class_prompt_texts(self):
        """Texts for each class (list of lists) according to the prompt mode."""
        mode = self.tcfg.PROMPT
        template = self.dataset_entry.template
        if mode == "descriptions":
            d = self.cfg.DATASET
            texts = load_descriptions(d.NAME, self.classnames, d.DESCRIPTIONS_DIR, d.DESCRIPTIONS_FILE)
            self.run_info["description_files"] = [file_record(
                d.NAME, descriptions_path(d.NAME, d.DESCRIPTIONS_DIR, d.DESCRIPTIONS_FILE),
                descriptions_source(d.DESCRIPTIONS_DIR, d.DESCRIPTIONS_FILE))]
            return texts
        if mode == "imagenet80":
            from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

            # The same 80 templates as the original's list (another order), then the dataset's.
            templates = [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] + [template]
        else:
            templates = [template] + (list(self.tcfg.TEMPLATES) if mode == "ensemble" else [])
        for t in templates:
            if "{}" not in t:
                raise UserError(f"template '{t}' has no '{{}}' for the class name")
        return [[t.format(readable_classname(c)) for t in templates] for c in self.classnames]

    def build_model(self):
        self.setup_backbone()
        texts = self.class_prompt_texts()
        logger.info(f"zero-shot prompts ({self.tcfg.PROMPT}), e.g. '{texts[0][0]}'")
        self.run_info["prompt_mode"] = self.tcfg.PROMPT
        self.text_features = mean_features(self.encode_texts([t for group in texts for t in group]), texts)
        self.model = self.backbone.model

    def class_text_features(self):
        return self.text_features

    def train(self, *args, **kwargs):
        raise UserError("ZeroShotCLIP has nothing to train; run it with --eval-only")
