"""Shared wiring of the image-supervised prompt learners (CoOp, CoCoOp, IVLP, MaPLe).

A subclass builds its learner module (all learnable tensors, nothing else) and
computes logits; this base trains it with cross-entropy on few-shot images,
and can start its text prompts from a MedPromptCLIP run (stacking).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from core.checkpoint import CHECKPOINT_POINTER, load_checkpoint, read_pointer
from core.errors import UserError
from core.optim import build_lr_scheduler, build_optimizer
from core.utils import count_parameters, logger, read_json

from clipkit.backbones import resolve_spec
from .base import CLIPTrainer
from clipkit.original_checkpoints import compare_frozen, read_original_run
from clipkit.prompt_layer import PromptLearner, template_prefix


def resolve_ctx_init(value, entry):
    """CTX_INIT words; 'template' means the dataset template's leading words."""
    return template_prefix(entry.template) if value == "template" else value


def find_prompt_checkpoint(run_dir):
    """Path of the latest prompt checkpoint of a MedPromptCLIP output folder."""
    path = read_pointer(os.path.join(run_dir, "prompt_learner"))
    if path is None:
        raise UserError(
            f"INIT_FROM {run_dir} holds no MedPromptCLIP prompts (expected "
            f"{os.path.join(run_dir, 'prompt_learner', CHECKPOINT_POINTER)}); "
            f"give the output folder of a finished MedPromptCLIP training run"
        )
    return path


class ImagePromptTrainer(CLIPTrainer):
    """Cross-entropy training of a prompt learner on labelled images."""

    KIND = "image-trained"

    def method_label(self):
        # Stacked runs are a method of their own in tables.
        label = super().method_label()
        return f"{label}+MedPromptCLIP" if self.tcfg.INIT_FROM else label

    def build_learner(self):
        """The nn.Module holding every learnable tensor of the method."""
        raise NotImplementedError

    def vision_prompts(self):
        """Visual prompts for the image encoder (list of (n_ctx, width)), or None."""
        return None

    def logits(self, images):
        """Logits (batch, n_classes) for images (batch, 3, H, W) and the current classes."""
        image_features = self.normalized_image_features(images, self.vision_prompts())
        return self.logit_scale * image_features @ self.fuse(self.class_text_features()).t()

    def build_text_prompts(self, n_ctx, depth=1, n_ctx_from_words=False, **kwargs):
        """The method's PromptLearner (context from TRAINER.<NAME>.CTX_INIT); sets the class tokens.

        The prompt is "{init words} {class}." with the first n_ctx tokens learnable, as the
        original trainers build it; ``n_ctx_from_words``: with init words, n_ctx is their
        word count (CoOp and CoCoOp count words, not tokens).
        """
        ctx_init = resolve_ctx_init(self.tcfg.CTX_INIT, self.dataset_entry)
        if n_ctx_from_words and ctx_init.strip():
            n_ctx = len(ctx_init.replace("_", " ").split())
        text = PromptLearner(self.text_encoder, self.prompt_tokenizer, n_ctx=n_ctx, depth=depth,
                             ctx_init=ctx_init, keep_init_words=True, **kwargs)
        self.tokens = text.tokens_for(self.classnames, self.dataset_entry.template).to(self.device)
        return text

    def require_visual_prompts(self, depth, key):
        """Raise a UserError unless the image tower takes ``depth`` layers of visual prompts."""
        if not self.image_encoder.supports_prompts:
            raise UserError(
                f"{self.cfg.TRAINER.NAME} vision prompts need a ViT image tower (open_clip or timm); backbone "
                f"{self.cfg.MODEL.BACKBONE.NAME} has none"
            )
        if depth > self.image_encoder.num_layers:
            raise UserError(f"{key} {depth} exceeds the {self.image_encoder.num_layers} layers of the image encoder")

    def text_prompts(self):
        """The PromptLearner holding this method's text context."""
        return getattr(self.prompt_learner, "text", self.prompt_learner)

    def text_prompt_targets(self):
        """Where MedPromptCLIP's tensors go: {name in its checkpoint: parameter here}."""
        text = self.text_prompts()
        targets = {"ctx": text.ctx}
        targets.update({f"deep_ctx.{i}": p for i, p in enumerate(text.deep_ctx)})
        return targets

    def class_text_features(self):
        """Normalized prompted text features (n_cls, D) of the current classes."""
        return F.normalize(self.text_prompts()(self.text_encoder, self.tokens).float(), dim=-1)

    def build_model(self):
        cfg = self.cfg
        self.setup_backbone()
        self.prompt_learner = self.build_learner().to(self.device)
        self.model = self.prompt_learner
        logger.info(
            f"{cfg.TRAINER.NAME}: {count_parameters(self.prompt_learner, trainable_only=True)} learnable values"
        )
        if self.tcfg.INIT_FROM:
            self.init_text_prompts(self.tcfg.INIT_FROM)
        self.optim = build_optimizer(self.prompt_learner, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", self.prompt_learner, self.optim, self.sched)
        if cfg.MODEL.INIT_WEIGHTS:
            self.load_init_weights("prompt_learner", cfg.MODEL.INIT_WEIGHTS)
        self.scaler = self.make_grad_scaler()

    def _same_backbone(self, name, pretrained):
        """Whether backbone ``name`` (with ``pretrained``) is the one this run uses."""
        own = (self.cfg.MODEL.BACKBONE.NAME, self.cfg.MODEL.BACKBONE.PRETRAINED)
        if (name, pretrained or "") == (own[0], own[1] or ""):
            return True
        try:
            return resolve_spec(name, pretrained) == resolve_spec(*own)
        except UserError:  # the source's backbone cannot be resolved here (e.g. a file no longer there)
            return False

    def _check_original_backbone(self, run_dir, original):
        """Prompts of the original code: the frozen CLIP saved with them must be this run's backbone."""
        match = compare_frozen(original, self.backbone.model)
        if match is None:
            raise UserError(
                f"INIT_FROM {run_dir}: checkpoint {original.path} holds no frozen CLIP to tell which backbone its "
                f"prompts were trained with, so they cannot be checked against {self.cfg.MODEL.BACKBONE.NAME}; give "
                f"an original MedPromptCLIP run (its checkpoints keep the frozen CLIP)"
            )
        if not match:
            raise UserError(
                f"INIT_FROM {run_dir}: the frozen CLIP saved in {original.path} is not backbone "
                f"{self.cfg.MODEL.BACKBONE.NAME}; stack on prompts learned with the same backbone"
            )

    def init_text_prompts(self, run_dir):
        """Copy MedPromptCLIP's context and deep text prompts into this learner (stacking)."""
        # Prompts saved by the original code: their text prompts as "ctx" and "deep_ctx.<i>".
        original = read_original_run(run_dir)
        path = original.path if original else find_prompt_checkpoint(run_dir)
        record = os.path.join(run_dir, "results.json")
        source_backbone = None
        if not original and os.path.isfile(record):
            source_run = read_json(record, what="results file")
            if source_run.get("trainer", "MedPromptCLIP") != "MedPromptCLIP":
                raise UserError(f"INIT_FROM {run_dir} is a {source_run['trainer']} run; give a MedPromptCLIP output folder")
            source_backbone = source_run.get("backbone")
        if original:
            source = {k[len("text."):] if k.startswith("text.") else k: v for k, v in original.state_dict.items()}
            self._check_original_backbone(run_dir, original)
        else:
            checkpoint = load_checkpoint(path)
            if checkpoint.get("trainer") not in (None, "MedPromptCLIP"):
                raise UserError(f"INIT_FROM {run_dir} is a {checkpoint['trainer']} run; give a MedPromptCLIP output folder")
            settings = checkpoint.get("settings") or {}
            source_backbone = source_backbone or checkpoint.get("backbone") or settings.get("MODEL.BACKBONE.NAME")
            if not source_backbone:
                raise UserError(
                    f"INIT_FROM {run_dir}: neither a results.json nor its checkpoint {path} records the backbone its "
                    f"prompts were trained with, so they cannot be checked against {self.cfg.MODEL.BACKBONE.NAME}; "
                    f"give the output folder of a MedPromptCLIP run of this program made with this backbone"
                )
            source_pretrained = settings.get("MODEL.BACKBONE.PRETRAINED", self.cfg.MODEL.BACKBONE.PRETRAINED)
            if not self._same_backbone(source_backbone, source_pretrained):
                raise UserError(
                    f"INIT_FROM {run_dir} was trained with backbone {source_backbone}, this run uses "
                    f"{self.cfg.MODEL.BACKBONE.NAME}; stack on prompts learned with the same backbone"
                )
            source = checkpoint["state_dict"]
        if "ctx" not in source:
            raise UserError(f"{path} holds no MedPromptCLIP context ('ctx'); give a MedPromptCLIP output folder")
        targets = self.text_prompt_targets()
        loaded, skipped = [], []
        with torch.no_grad():
            for name, tensor in source.items():
                if name not in targets:
                    skipped.append(name)
                    continue
                param = targets[name]
                if param.shape == tensor.shape:
                    param.copy_(tensor.to(param.device, param.dtype))
                elif param.dim() == tensor.dim() + 1 and param.shape[1:] == tensor.shape:
                    # Shared context into class-specific context: every class starts from it.
                    param.copy_(tensor.to(param.device, param.dtype).expand_as(param))
                else:
                    raise UserError(
                        f"MedPromptCLIP prompt {name} from {path} has shape {tuple(tensor.shape)} but "
                        f"{self.cfg.TRAINER.NAME} expects {tuple(param.shape)}; train both with the same backbone, "
                        f"number of context tokens (N_CTX/CTX_INIT) and text prompt depth"
                    )
                loaded.append(name)
        if not loaded:
            raise UserError(f"no tensor of {path} fits {self.cfg.TRAINER.NAME}'s text prompts")
        logger.info(f"initialized text prompts from {path}: loaded {loaded}; not used {skipped}")
        self.run_info["init_from"] = {"checkpoint": path, "loaded": loaded, "not_used": skipped}
        if original:
            self.run_info["init_from"]["original"] = original.record()

    def forward_backward(self, batch):
        images, labels = self.parse_batch_train(batch)
        with self.autocast():
            logits = self.logits(images)
        loss = F.cross_entropy(logits.float(), labels)
        self.step_with_scaler(loss)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        acc = (logits.argmax(dim=1) == labels).float().mean().item() * 100
        return {"loss": loss.item(), "acc": acc}

    @torch.no_grad()
    def model_inference(self, images):
        with self.autocast():
            return self.logits(images).float()

    def normalized_image_features(self, images, prompts=None):
        return F.normalize(self.image_encoder(images, prompts).float(), dim=-1)


def add_common_keys(node, prec="fp32"):
    """Keys every image-supervised prompt learner has."""
    # Output folder of a MedPromptCLIP run whose text prompts initialize this learner
    # (stacking); empty = start from CTX_INIT. train.py's --init-from sets it.
    node.INIT_FROM = ""
    # Precision: fp32, amp (autocast) or fp16 (half backbone, CUDA only).
    node.PREC = prec
