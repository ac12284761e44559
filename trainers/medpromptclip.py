"""MedPromptCLIP: prompt learning from text alone.

Training pairs are (class template, LLM description of that class). The
learnable context replaces the template's leading words ("[ctx] glaucoma.")
and deep text prompts replace those positions again in layers 2..J; CLIP is
frozen. The loss pulls the normalized prompted-template feature onto the
normalized frozen feature of the description (L1, or MSE x weight). No image
is read during training; at test time the learned prompts with each class
name classify images zero-shot.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from yacs.config import CfgNode as CN

from core.engine import TRAINER_REGISTRY
from core.errors import UserError
from core.optim import build_lr_scheduler, build_optimizer
from core.utils import count_parameters, logger
from datasets.catalog import get_entry, resolve_target

from .base import CLIPTrainer
from clipkit.descriptions import descriptions_path, descriptions_source, file_record, load_descriptions
from clipkit.prompt_layer import PromptLearner, PromptTokens, template_prefix

LOSSES = ("l1", "mse")


def extend_cfg(cfg):
    cfg.TRAINER.MEDPROMPTCLIP = CN()
    # Context tokens; the prompt is "[ctx] {class}.".
    cfg.TRAINER.MEDPROMPTCLIP.N_CTX = 6
    # Words whose first N_CTX tokens initialize the context; "template" = the leading words
    # of the dataset's modality template ("a fundus image of"); empty = random. With more
    # context tokens than the words have, the context is random (logged), as in the original.
    cfg.TRAINER.MEDPROMPTCLIP.CTX_INIT = ""
    # Text layers that get prompts: 1 = only the input context (shallow); J > 1 adds
    # deep prompts before layers 2..J.
    cfg.TRAINER.MEDPROMPTCLIP.PROMPT_DEPTH_TEXT = 9
    # Text-to-text loss: l1 (mean absolute error) or mse (mean squared error x MSE_WEIGHT).
    cfg.TRAINER.MEDPROMPTCLIP.LOSS = "l1"
    cfg.TRAINER.MEDPROMPTCLIP.MSE_WEIGHT = 1000.0
    # Datasets or modality groups whose descriptions are pooled for training (multi-modal);
    # empty = the dataset being trained on (specific-modal and base-to-new).
    cfg.TRAINER.MEDPROMPTCLIP.DESCRIPTION_SOURCES = []
    # A class without descriptions in its file: error, or skip (train on the other classes' texts, as
    # the original code did; the context is shared, so the skipped class is still classified).
    cfg.TRAINER.MEDPROMPTCLIP.MISSING_DESCRIPTIONS = "error"
    # Precision: fp32, amp (autocast) or fp16 (half backbone, CUDA only).
    cfg.TRAINER.MEDPROMPTCLIP.PREC = "fp32"


class TextPairLoader:
    """Batches of (class row, description row) index pairs, reshuffled every epoch.

    The pairs are built on first use, so an evaluation-only run never reads
    description files.
    """

    def __init__(self, build_pairs, batch_size, seed=None):
        self._build_pairs = build_pairs
        self.batch_size = batch_size
        self.seed = seed
        self._pairs = None
        self.epoch = 0

    @property
    def pairs(self):
        if self._pairs is None:
            self._pairs = self._build_pairs()
        return self._pairs

    def __len__(self):
        return math.ceil(len(self.pairs) / self.batch_size)

    def __iter__(self):
        pairs = self.pairs
        generator = torch.Generator()
        if self.seed is not None and self.seed >= 0:
            generator.manual_seed(self.seed * 100003 + self.epoch)
        else:
            generator.seed()
        self.epoch += 1
        order = torch.randperm(len(pairs), generator=generator)
        for start in range(0, len(order), self.batch_size):
            chunk = pairs[order[start:start + self.batch_size]]
            yield {"class_index": chunk[:, 0], "description_index": chunk[:, 1]}


@TRAINER_REGISTRY.register()
class MedPromptCLIP(CLIPTrainer):
    cfg_key = "MEDPROMPTCLIP"
    KIND = "text-only"
    RECIPES = {"base2new": "base2new", "fewshot": "specific_modal", "crossmodal": "multi_modal"}
    # The demo's few text pairs need a longer schedule than the paper's recipes.
    DEMO_RECIPES = {"default": "demo"}
    DEFAULT_IN = ("base2new", "fewshot", "crossmodal")
    PROMPT_SHAPE_KEYS = ("MEDPROMPTCLIP", "N_CTX", "PROMPT_DEPTH_TEXT")
    NEEDS_DESCRIPTIONS = True
    uses_frozen_image_features = True

    @classmethod
    def descriptions_read(cls, cfg, eval_only):
        if eval_only:
            return []  # evaluation reads the learned prompts, not the descriptions
        names = []
        for target in cfg.TRAINER.MEDPROMPTCLIP.DESCRIPTION_SOURCES or [cfg.DATASET.NAME]:
            try:
                names += [n for n in resolve_target(target) if n not in names]
            except KeyError:
                names.append(target)  # an unknown source fails when the run starts
        return names

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        tcfg = cfg.TRAINER.MEDPROMPTCLIP
        if tcfg.MISSING_DESCRIPTIONS not in ("error", "skip"):
            raise UserError(f"TRAINER.MEDPROMPTCLIP.MISSING_DESCRIPTIONS must be error or skip, not '{tcfg.MISSING_DESCRIPTIONS}'")
        if tcfg.LOSS not in LOSSES:
            raise UserError(f"TRAINER.MEDPROMPTCLIP.LOSS must be l1 or mse, not '{tcfg.LOSS}'")
        sources = [s for s in tcfg.DESCRIPTION_SOURCES if s != cfg.DATASET.NAME]
        if cfg.DATASET.SUBSAMPLE_CLASSES != "all" and sources:
            raise UserError(
                "base-to-new training reads only the dataset's own base-class descriptions; "
                "clear TRAINER.MEDPROMPTCLIP.DESCRIPTION_SOURCES"
            )

    # ---------------------------------------------------------------- data
    def build_data_loader(self):
        """Images for evaluation come from the data manager; training data are text pairs."""
        super().build_data_loader()
        self.train_sources = self.description_sources()
        self.train_loader_x = TextPairLoader(self.build_pairs, self.cfg.DATALOADER.TRAIN_X.BATCH_SIZE, self.cfg.SEED)

    def description_sources(self):
        """(dataset name, class names) whose descriptions are trained on."""
        cfg = self.cfg
        names = []
        for target in cfg.TRAINER.MEDPROMPTCLIP.DESCRIPTION_SOURCES or [cfg.DATASET.NAME]:
            try:
                names += [n for n in resolve_target(target) if n not in names]
            except KeyError as e:
                raise UserError(f"TRAINER.MEDPROMPTCLIP.DESCRIPTION_SOURCES: {e.args[0]}") from None
        sources = []
        for name in names:
            # The trained dataset contributes only the classes of its subsample (base classes
            # in base-to-new), so no other class's text reaches training.
            classnames = self.classnames if name == cfg.DATASET.NAME else list(get_entry(name).classnames)
            sources.append((name, classnames))
        return sources

    def build_pairs(self):
        """(n_pairs, 2) tensor of (class row, description row); fills the texts to encode."""
        rows, descriptions, pairs, files, skipped = [], [], [], [], []
        d = self.cfg.DATASET
        skip = self.cfg.TRAINER.MEDPROMPTCLIP.MISSING_DESCRIPTIONS == "skip"
        for name, classnames in self.train_sources:
            # DESCRIPTIONS_FILE names the trained dataset's file; pooled sources keep theirs.
            file = d.DESCRIPTIONS_FILE if name == d.NAME else ""
            per_class = load_descriptions(name, classnames, d.DESCRIPTIONS_DIR, file, allow_missing=skip,
                                          missing_hint="set TRAINER.MEDPROMPTCLIP.MISSING_DESCRIPTIONS skip to "
                                                       "train on the others (as the original code did)")
            files.append(file_record(name, descriptions_path(name, d.DESCRIPTIONS_DIR, file),
                                     descriptions_source(d.DESCRIPTIONS_DIR, file)))
            for classname, texts in zip(classnames, per_class):
                if not texts:
                    skipped.append(classname)
                    continue
                row = len(rows)
                rows.append((name, classname))
                for text in texts:
                    pairs.append((row, len(descriptions)))
                    descriptions.append(text)
        self.train_rows = rows
        self.train_descriptions = descriptions
        if not pairs:
            raise UserError(f"no class of {', '.join(n for n, _ in self.train_sources)} has descriptions in "
                            f"{', '.join(f['path'] for f in files)}; nothing to train on")
        self.run_info["description_files"] = files
        if skipped:
            self.run_info["classes_without_descriptions"] = skipped
            logger.info(f"classes without descriptions, not trained on: {', '.join(skipped)}")
        self.run_info["train_pairs"] = len(pairs)
        self.run_info["train_classes"] = len(rows)
        logger.info(f"text pairs: {len(pairs)} descriptions of {len(rows)} classes from {len(self.train_sources)} dataset(s)")
        return torch.tensor(pairs, dtype=torch.long)

    # ---------------------------------------------------------------- model
    def build_model(self):
        cfg, tcfg = self.cfg, self.cfg.TRAINER.MEDPROMPTCLIP
        self.setup_backbone()
        ctx_init = tcfg.CTX_INIT
        if ctx_init == "template":
            ctx_init = template_prefix(self.dataset_entry.template)
        self.prompt_learner = PromptLearner(
            self.text_encoder, self.prompt_tokenizer, n_ctx=tcfg.N_CTX, ctx_init=ctx_init,
            depth=tcfg.PROMPT_DEPTH_TEXT,
        ).to(self.device)
        self.model = self.prompt_learner
        logger.info(
            f"MedPromptCLIP: {self.prompt_learner.n_ctx} context tokens "
            f"({'from ' + repr(self.prompt_learner.ctx_init) if self.prompt_learner.ctx_init else 'random'}), "
            f"text depth {self.prompt_learner.depth}, "
            f"{count_parameters(self.prompt_learner, trainable_only=True)} learnable values"
        )
        self.optim = build_optimizer(self.prompt_learner, cfg.OPTIM)
        self.sched = build_lr_scheduler(self.optim, cfg.OPTIM)
        self.register_model("prompt_learner", self.prompt_learner, self.optim, self.sched)
        if cfg.MODEL.INIT_WEIGHTS:
            self.load_init_weights("prompt_learner", cfg.MODEL.INIT_WEIGHTS)
        self.scaler = self.make_grad_scaler()

    def tensor_settings(self):
        return {"TRAINER.MEDPROMPTCLIP.N_CTX": self.prompt_learner.n_ctx,
                "TRAINER.MEDPROMPTCLIP.PROMPT_DEPTH_TEXT": self.prompt_learner.depth}

    def tokens_for_rows(self, rows):
        """Prompt tokens for (dataset, classname) rows, each with its dataset's template."""
        parts = []
        for name in dict.fromkeys(n for n, _ in rows):
            template = get_entry(name).template
            parts.append(self.prompt_learner.tokens_for([c for n, c in rows if n == name], template))
        return PromptTokens.cat(parts).to(self.device)

    # ---------------------------------------------------------------- training
    def before_train(self):
        if getattr(self, "description_features", None) is None:
            _ = self.train_loader_x.pairs  # build pairs (reads descriptions) before anything else
            self.train_tokens = self.tokens_for_rows(self.train_rows)
            # The frozen targets are encoded once per run, not per step.
            self.description_features = self.encode_texts(self.train_descriptions)
        super().before_train()
        # A resumed run continues the shuffle order where the interrupted one stopped.
        self.train_loader_x.epoch = self.start_epoch

    def parse_batch_train(self, batch):
        return batch["class_index"].to(self.device), batch["description_index"].to(self.device)

    def prompted_features(self, class_rows):
        """Normalized prompted-template features (n, D) for class rows, each distinct row encoded once."""
        unique, inverse = torch.unique(class_rows, return_inverse=True)
        with self.autocast():
            feats = self.prompt_learner(self.text_encoder, self.train_tokens.select(unique))
        return F.normalize(feats.float(), dim=-1)[inverse]

    def compute_loss(self, prompted, target):
        if self.cfg.TRAINER.MEDPROMPTCLIP.LOSS == "l1":
            return F.l1_loss(prompted, target)
        return F.mse_loss(prompted, target) * self.cfg.TRAINER.MEDPROMPTCLIP.MSE_WEIGHT

    def forward_backward(self, batch):
        class_rows, description_rows = self.parse_batch_train(batch)
        loss = self.compute_loss(self.prompted_features(class_rows), self.description_features[description_rows])
        self.step_with_scaler(loss)
        if (self.batch_idx + 1) == self.num_batches:
            self.update_lr()
        return {"loss": loss.item()}

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def class_text_features(self):
        tokens = self.prompt_learner.tokens_for(self.classnames, self.dataset_entry.template).to(self.device)
        with self.autocast():
            feats = self.prompt_learner(self.text_encoder, tokens)
        return F.normalize(feats.float(), dim=-1)
