"""ProGrad (Zhu et al., ICCV 2023): CoOp whose updates never go against the zero-shot model's knowledge.

Per step, with the cross-entropy gradient g_ce and the gradient g_kl of the distillation loss towards
the zero-shot prompts' predictions,

    kl = T^2 * mean_batch sum_c -softmax(z_zs / T)_c * log_softmax(z / T)_c
    g  = g_ce                                         if g_ce . g_kl >= 0
    g  = g_ce - LAMBDA * (g_ce . g_kl / |g_kl|^2) g_kl  otherwise (the part of g_ce against g_kl removed)

computed per learnable tensor, then an optimizer step with g. z: the learned prompts' logits; z_zs: the
frozen backbone's logits with the dataset's hand-crafted prompts. TEACHER "student" reproduces the
published BiomedCLIP code, whose teacher logits are the learned prompts' own (detached): g_kl is then zero
(in the published code, zero up to rounding) and the method is CoOp with ProGrad's recipe.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError
from core.utils import logger
from datasets.catalog import readable_classname

from .coop import CoOp
from .image_prompt import add_common_keys

TEACHERS = ("zero-shot", "student")


def extend_cfg(cfg):
    cfg.TRAINER.PROGRAD = CN()
    # Context tokens when CTX_INIT is empty (random initialization).
    cfg.TRAINER.PROGRAD.N_CTX = 4
    # Words that initialize the context (their word count is the context size, as in CoOp);
    # "template" = the dataset template's leading words; empty = random.
    cfg.TRAINER.PROGRAD.CTX_INIT = "a photo of a"
    # Class-specific context (one context per class) instead of one shared context.
    cfg.TRAINER.PROGRAD.CSC = False
    # Where the class name sits: end, middle or front.
    cfg.TRAINER.PROGRAD.CLASS_TOKEN_POSITION = "end"
    # Distillation temperature T.
    cfg.TRAINER.PROGRAD.T = 1.0
    # How much of the conflicting gradient component is removed (1 = all, the paper's value).
    cfg.TRAINER.PROGRAD.LAMBDA = 1.0
    # Whose predictions g_kl pulls towards: "zero-shot" (the paper) or "student" (the published
    # BiomedCLIP code: the learned prompts themselves, which makes g_kl zero).
    cfg.TRAINER.PROGRAD.TEACHER = "zero-shot"
    add_common_keys(cfg.TRAINER.PROGRAD)


def distillation(logits, teacher_logits, T):
    """T^2 * batch mean of the cross-entropy from softmax(teacher / T) to softmax(logits / T)."""
    target = F.softmax(teacher_logits / T, dim=-1)
    return (-(target * F.log_softmax(logits / T, dim=-1)).sum(dim=-1)).mean() * T * T


def project(g_ce, g_kl, lam):
    """g_ce without (``lam`` times) its component against g_kl, when the two conflict."""
    dot = (g_ce * g_kl).sum()
    norm2 = (g_kl * g_kl).sum()
    if dot >= 0 or norm2 == 0:
        return g_ce
    return g_ce - lam * dot / norm2 * g_kl


@TRAINER_REGISTRY.register()
class ProGrad(CoOp):
    cfg_key = "PROGRAD"
    RECIPES = {"base2new": "base2new", "fewshot": "fewshot"}
    RECIPES_BY_SHOTS = {}
    DEMO_RECIPES = {"default": "demo"}
    DEFAULT_IN = ()
    PROMPT_SHAPE_KEYS = ("PROGRAD", "N_CTX", None)

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if cfg.TRAINER.PROGRAD.TEACHER not in TEACHERS:
            raise UserError(f"TRAINER.PROGRAD.TEACHER must be zero-shot or student, not '{cfg.TRAINER.PROGRAD.TEACHER}'")
        if cfg.TRAINER.PROGRAD.T <= 0:
            raise UserError(f"TRAINER.PROGRAD.T must be above 0, not {cfg.TRAINER.PROGRAD.T}")

    def build_model(self):
        super().build_model()
        template = self.dataset_entry.template
        texts = [template.format(readable_classname(c)) for c in self.classnames]
        logger.info(f"ProGrad teacher: {self.tcfg.TEACHER}" + (f", e.g. '{texts[0]}'" if self.tcfg.TEACHER == "zero-shot" else ""))
        self.zero_shot_text = self.encode_texts(texts)
        self.run_info["prograd_teacher"] = self.tcfg.TEACHER

    def tensor_settings(self):
        text = self.prompt_learner
        return {"TRAINER.PROGRAD.N_CTX": text.n_ctx, "TRAINER.PROGRAD.CSC": text.class_specific,
                "TRAINER.PROGRAD.CLASS_TOKEN_POSITION": text.position}

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        t = self.tcfg
        with self.autocast():
            image_features = self.normalized_image_features(images)
            logits = (self.logit_scale * image_features @ self.class_text_features().t()).float()
        if t.TEACHER == "zero-shot":
            teacher = self.logit_scale * image_features.float() @ self.zero_shot_text.float().t()
        else:
            teacher = logits.detach()
        ce = F.cross_entropy(logits, labels)
        kl = distillation(logits, teacher, t.T)
        self.detect_anomaly(ce)
        params = [p for p in self.prompt_learner.parameters() if p.requires_grad]
        # Both gradients through the same (possibly scaled) graph: the projection is scale-free.
        if t.TEACHER == "student":
            # Analytically zero (the published code's is rounding noise, which the projection would amplify).
            g_kl = [None] * len(params)
        else:
            g_kl = torch.autograd.grad(self.scaler.scale(kl), params, retain_graph=True, allow_unused=True)
        g_ce = torch.autograd.grad(self.scaler.scale(ce), params, allow_unused=True)
        self.model_zero_grad()
        for p, a, b in zip(params, g_ce, g_kl):
            if a is not None:
                p.grad = project(a, b, t.LAMBDA) if b is not None else a
        self.scaler.step(self.optim)
        self.scaler.update()
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        acc = (logits.argmax(dim=1) == labels).float().mean().item() * 100
        return {"loss": ce.item(), "kl": kl.item(), "acc": acc}
