"""BiomedCoOp (Koleilat et al., CVPR 2025): CoOp guided by an ensemble of LLM descriptions of each class.

Per batch of B images (normalized features f, labels y) and C classes, with the backbone's logit
scale s, the learned prompts' normalized text features t (C, D) and the frozen backbone's normalized
features F (C, P, D) of the first P = N_PROMPTS descriptions of every class (llm_descriptions/<dataset>.json;
description i of every class is "prompt set" i):

- semantic consistency (SCCM): MSE(t, tbar), mean over C x D, tbar_c = normalize(mean_i F[c, i]) (all P sets);
- outlier pruning: score_i = mean_b max_c s * f_b . F[c, i]; set i is kept iff
  |score_i - mean(score)| <= TAU * std(score) (unbiased), jointly for all classes, for this batch;
- knowledge distillation (KDSP): the zero-shot logits z_zs = s * f . ttilde^T with
  ttilde_c = normalize(mean over kept i of F[c, i]), and
  KL(softmax(z_zs) || softmax(z)) summed over batch and classes and divided by B * C;

    loss = CE(z, y) + SCCM_LAMBDA * SCCM + KDSP_LAMBDA * KDSP,    z = s * f . t^T.

Evaluation uses the learned prompts alone. The published code computes the learned prompts' text
features in training with the text tower's dropout active (TEXT_DROPOUT True reproduces it); the
paper's frozen encoder has none.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError
from core.utils import logger

from .coop import CoOp
from .image_prompt import add_common_keys
from clipkit.descriptions import descriptions_path, load_descriptions


def extend_cfg(cfg):
    cfg.TRAINER.BIOMEDCOOP = CN()
    # Context tokens when CTX_INIT is empty (random initialization).
    cfg.TRAINER.BIOMEDCOOP.N_CTX = 4
    # Words that initialize the context (their word count is the context size, as in CoOp);
    # "template" = the dataset template's leading words; empty = random.
    cfg.TRAINER.BIOMEDCOOP.CTX_INIT = "a photo of a"
    # Class-specific context (one context per class) instead of one shared context.
    cfg.TRAINER.BIOMEDCOOP.CSC = False
    # Where the class name sits: end, middle or front.
    cfg.TRAINER.BIOMEDCOOP.CLASS_TOKEN_POSITION = "end"
    # Weight of the semantic-consistency loss (MSE to the mean description feature).
    cfg.TRAINER.BIOMEDCOOP.SCCM_LAMBDA = 1.0
    # Weight of the distillation loss from the pruned description ensemble.
    cfg.TRAINER.BIOMEDCOOP.KDSP_LAMBDA = 1.0
    # Outlier threshold: a prompt set is kept within TAU standard deviations of the mean score.
    cfg.TRAINER.BIOMEDCOOP.TAU = 1.5
    # Descriptions per class used (the first N_PROMPTS of each class; every class needs as many).
    cfg.TRAINER.BIOMEDCOOP.N_PROMPTS = 50
    # Text-tower dropout on while computing the learned prompts' features in training, as the
    # published code runs (its whole model is in train mode); False = the frozen encoder of the paper.
    cfg.TRAINER.BIOMEDCOOP.TEXT_DROPOUT = False
    add_common_keys(cfg.TRAINER.BIOMEDCOOP)


def prune_mask(image_features, description_features, logit_scale, tau):
    """(P,) bool: prompt sets whose batch score lies within ``tau`` standard deviations of the mean.

    image_features: (B, D) normalized; description_features: (C, P, D) normalized.
    """
    logits = logit_scale * torch.einsum("bd,cpd->pbc", image_features, description_features)
    scores = logits.max(dim=-1).values.mean(dim=-1)
    keep = (scores - scores.mean()).abs() <= tau * scores.std() if scores.numel() > 1 else scores == scores
    # TAU below 1 can drop every set; the teacher then keeps them all.
    return keep if keep.any() else torch.ones_like(keep)


def kl_teacher_student(logits, teacher_logits):
    """KL(softmax(teacher) || softmax(logits)) summed over batch and classes, divided by B * C."""
    log_p = F.log_softmax(logits, dim=-1)
    log_q = F.log_softmax(teacher_logits, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum() / logits.numel()


@TRAINER_REGISTRY.register()
class BiomedCoOp(CoOp):
    cfg_key = "BIOMEDCOOP"
    RECIPES = {"base2new": "base2new", "fewshot": "fewshot"}
    RECIPES_BY_SHOTS = {}
    DEMO_RECIPES = {"default": "demo"}
    DEFAULT_IN = ()
    PROMPT_SHAPE_KEYS = ("BIOMEDCOOP", "N_CTX", None)
    NEEDS_DESCRIPTIONS = True

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        t = cfg.TRAINER.BIOMEDCOOP
        if t.N_PROMPTS < 1:
            raise UserError(f"TRAINER.BIOMEDCOOP.N_PROMPTS must be at least 1, not {t.N_PROMPTS}")
        if t.TAU <= 0:
            raise UserError(f"TRAINER.BIOMEDCOOP.TAU must be above 0, not {t.TAU}")

    def build_model(self):
        super().build_model()
        t, dataset = self.tcfg, self.cfg.DATASET
        texts = load_descriptions(dataset.NAME, self.classnames, dataset.DESCRIPTIONS_DIR)
        path = descriptions_path(dataset.NAME, dataset.DESCRIPTIONS_DIR)
        short = [(c, len(d)) for c, d in zip(self.classnames, texts) if len(d) < t.N_PROMPTS]
        if short:
            c, n = short[0]
            raise UserError(
                f"BiomedCoOp uses {t.N_PROMPTS} descriptions per class, but {path} has {n} for '{c}'"
                f"{f' (and {len(short) - 1} more short classes)' if len(short) > 1 else ''}; "
                f"add descriptions or set TRAINER.BIOMEDCOOP.N_PROMPTS {min(n for _, n in short)}"
            )
        flat = [d for group in texts for d in group[:t.N_PROMPTS]]
        feats = self.encode_texts(flat).float()
        # (C, P, D): description i of every class is prompt set i.
        self.description_features = feats.view(len(self.classnames), t.N_PROMPTS, -1)
        self.sccm_target = F.normalize(self.description_features.mean(dim=1), dim=-1)
        self.run_info["descriptions_file"] = path
        logger.info(f"BiomedCoOp: {t.N_PROMPTS} descriptions per class from {path}")

    def tensor_settings(self):
        text = self.prompt_learner
        return {"TRAINER.BIOMEDCOOP.N_CTX": text.n_ctx, "TRAINER.BIOMEDCOOP.CSC": text.class_specific,
                "TRAINER.BIOMEDCOOP.CLASS_TOKEN_POSITION": text.position}

    def student_text_features(self):
        if not self.tcfg.TEXT_DROPOUT:
            return self.class_text_features()
        self.text_encoder.train()
        try:
            return self.class_text_features()
        finally:
            self.text_encoder.eval()

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        t, s = self.tcfg, self.logit_scale
        with self.autocast():
            image_features = self.normalized_image_features(images)
            text_features = self.student_text_features()
            logits = (s * image_features @ text_features.t()).float()
        image_features = image_features.float()
        with torch.no_grad():
            keep = prune_mask(image_features, self.description_features, s, t.TAU)
            teacher_text = F.normalize(self.description_features[:, keep].mean(dim=1), dim=-1)
            teacher_logits = s * image_features @ teacher_text.t()
        ce = F.cross_entropy(logits, labels)
        sccm = F.mse_loss(text_features.float(), self.sccm_target)
        kd = kl_teacher_student(logits, teacher_logits)
        loss = ce + t.SCCM_LAMBDA * sccm + t.KDSP_LAMBDA * kd
        self.step_with_scaler(loss)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        acc = (logits.argmax(dim=1) == labels).float().mean().item() * 100
        return {"loss": loss.item(), "ce": ce.item(), "sccm": sccm.item(), "kd": kd.item(),
                "kept_prompts": int(keep.sum()), "acc": acc}
