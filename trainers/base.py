"""What every CLIP trainer shares: backbone loading, precision, cached evaluation."""
from __future__ import annotations

import os
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from core.engine import TrainerX
from core.errors import UserError
from core.utils import count_parameters, logger, progress, set_threads
from datasets.declared import entry_for_cfg
from datasets.split_dataset import register_declared

from clipkit.backbones import load_backbone
from clipkit.feature_cache import FeatureCache, backbone_identity, resolve_cache_dir
from clipkit.original_checkpoints import load_original_model
from clipkit.prompt_layer import ImageEncoder, PromptTokenizer, TextEncoder

PRECISIONS = ("fp32", "amp", "fp16")


def file_stamp(path):
    """[size, mtime_ns] of a file, [-1, -1] if it cannot be read (its loading then says why)."""
    try:
        stat = os.stat(path)
    except OSError:
        return [-1, -1]
    return [stat.st_size, stat.st_mtime_ns]


class CLIPTrainer(TrainerX):
    """A TrainerX whose model is built around one frozen open_clip backbone.

    Subclasses set ``cfg_key`` (their node under TRAINER) and implement
    ``build_model``. Those whose logits depend only on frozen image features
    and per-class text features implement ``class_text_features`` and get
    evaluation that encodes each image once per run.

    A trainer declares on its class what the rest of the project needs to know about it; sweeps
    (scripts/sweep.py), the recipe chooser (trainers/recipes.py), the aggregator and the checkpoint
    readers read these attributes through ``trainers.trainer_class(name)`` and keep no list of
    trainer names. A subclass overrides only what differs:

    ``KIND``
        "zero-shot" (nothing trained; evaluated once, one seed), "text-only" (trained on text, no
        image), "image-trained" (prompts trained on few-shot images) or "feature-based" (a model on
        frozen features of few-shot images). Sweeps give the last two ``DATASET.NUM_SHOTS``; tables
        group rows by it.
    ``LABEL``
        The method's name in tables; empty = the registered name (``method_label`` may refine it).
    ``RECIPES``
        {protocol: recipe}, the recipe (``configs/trainers/<Trainer>/<recipe>.yaml``) each sweep
        protocol runs: "base2new", "fewshot", "crossmodal", "zeroshot", and "stacked" (few-shot
        rows started from MedPromptCLIP prompts, ``--init-from``). A protocol absent from the dict
        is unsupported: a sweep asked to run the trainer there stops with one line.
    ``RECIPES_BY_SHOTS``
        {protocol: {shots: recipe}}: a shot-dependent schedule (CoOp's 50/100/200 epochs); shots
        not listed use ``RECIPES``.
    ``DEMO_RECIPES``
        {protocol: recipe} used on the synthetic demo dataset instead (published schedules suit
        real data); the key "default" serves every other protocol. Empty: the demo runs ``RECIPES``.
    ``DEFAULT_IN``
        Protocols whose sweep runs the trainer when METHODS is not set ("stacked": the few-shot
        sweep runs it as "<Trainer>+MedPromptCLIP").
    ``PROMPT_SHAPE_KEYS``
        (node, context-size key, depth key or None) under TRAINER where the trainer keeps its text
        context size and depth, for trainers that can start from MedPromptCLIP prompts
        (``TRAINER.<node>.INIT_FROM``); None = it cannot.
    ``NEEDS_DESCRIPTIONS``
        True if a run reads ``llm_descriptions/<dataset>.json`` (the sweep's preflight checks it).

    A trainer that subclasses another inherits these like any attribute: it re-declares those that
    name the parent's recipe folder or config node (``RECIPES``, ``RECIPES_BY_SHOTS``,
    ``DEMO_RECIPES``, ``DEFAULT_IN``, ``PROMPT_SHAPE_KEYS``); tests/test_sweeps.py checks every
    registered trainer's declarations against its files and config node.
    """

    cfg_key = ""
    LABEL = ""
    RECIPES = {}
    RECIPES_BY_SHOTS = {}
    DEMO_RECIPES = {}
    DEFAULT_IN = ()
    PROMPT_SHAPE_KEYS = None
    NEEDS_DESCRIPTIONS = False

    def method_label(self):
        return self.LABEL or self.cfg.TRAINER.NAME

    @classmethod
    def descriptions_read(cls, cfg, eval_only):
        """Names of the datasets whose descriptions file a run with ``cfg`` reads (for its identity)."""
        return []

    @property
    def tcfg(self):
        return self.cfg.TRAINER[self.cfg_key] if self.cfg_key else None

    @property
    def prec(self):
        return self.tcfg.PREC if self.tcfg is not None and "PREC" in self.tcfg else "fp32"

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        if not 0.0 <= cfg.TEST.FUSE_DESCRIPTIONS <= 1.0:
            raise UserError(f"TEST.FUSE_DESCRIPTIONS is a weight between 0 and 1, not {cfg.TEST.FUSE_DESCRIPTIONS}")
        node = cfg.TRAINER[self.cfg_key] if self.cfg_key else None
        if node is not None and "PREC" in node and node.PREC not in PRECISIONS:
            raise UserError(f"TRAINER.{self.cfg_key}.PREC must be one of {', '.join(PRECISIONS)}, not '{node.PREC}'")

    # ---------------------------------------------------------------- data
    def build_data_loader(self):
        cfg = self.cfg
        self.dataset_entry = entry_for_cfg(cfg)
        if self.dataset_entry.declared_in:
            register_declared(self.dataset_entry.name)
        self.backbone = load_backbone(
            cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PRETRAINED, cfg.MODEL.BACKBONE.CACHE_DIR, device="cpu"
        )
        self.run_info["backbone_identity"] = self.backbone.identity
        threads, why = set_threads(cfg.NUM_THREADS, count_parameters(self.backbone.model))
        logger.info(f"torch threads: {threads} ({why})")
        self.fill_input_cfg()
        super().build_data_loader()
        self.classnames = list(self.dm.dataset.classnames)
        for key in ("split_source", "split_file", "split_sha256", "shots_used"):
            if hasattr(self.dm.dataset, key):
                self.run_info[key] = getattr(self.dm.dataset, key)
        if self.dataset_entry.declared_in:
            self.run_info["dataset_declared_in"] = self.dataset_entry.declared_in

    def fill_input_cfg(self):
        """Image size and normalization from the backbone unless the config sets them."""
        cfg, bb = self.cfg, self.backbone
        was_frozen = cfg.is_frozen()
        cfg.defrost()
        if not cfg.INPUT.SIZE:
            cfg.INPUT.SIZE = tuple(bb.image_size)
        if not cfg.INPUT.PIXEL_MEAN:
            cfg.INPUT.PIXEL_MEAN = tuple(bb.mean)
        if not cfg.INPUT.PIXEL_STD:
            cfg.INPUT.PIXEL_STD = tuple(bb.std)
        if was_frozen:
            cfg.freeze()

    # ---------------------------------------------------------------- model
    def load_model(self, directory, epoch=None):
        """--model-dir: a run of this project, or prompts saved by the original code (mapped to our names)."""
        if directory and load_original_model(self, directory, epoch):
            return
        super().load_model(directory, epoch)

    def checkpoint_settings(self):
        settings = super().checkpoint_settings()
        settings["MODEL.BACKBONE.NAME"] = self.cfg.MODEL.BACKBONE.NAME
        settings["MODEL.BACKBONE.PRETRAINED"] = self.cfg.MODEL.BACKBONE.PRETRAINED
        settings.update(self.tensor_settings())
        return settings

    def tensor_settings(self):
        """{config key: value} of the settings that shape the learnable tensors.

        Context sizes are the numbers of tokens actually learned, which CTX_INIT
        can decide (CoOp learns as many tokens as its init words have).
        """
        return {}

    def setup_backbone(self):
        """Move the frozen backbone to the device in the configured precision; build the encoders."""
        model = self.backbone.model
        if self.prec == "fp16":
            if self.device.type != "cuda":
                raise UserError("PREC fp16 needs a CUDA device; use fp32 (or amp) on the CPU")
            model.half()
        model.to(self.device)
        self.text_encoder = TextEncoder(model)
        self.image_encoder = ImageEncoder(model)
        self.prompt_tokenizer = PromptTokenizer(self.backbone.tokenizer, self.backbone.context_length)
        self.logit_scale = model.logit_scale.detach().exp().item()
        logger.info(f"precision {self.prec} on {self.device}")

    def autocast(self):
        """Mixed precision for PREC amp: float16 on CUDA, bfloat16 on the CPU."""
        if self.prec != "amp":
            return nullcontext()
        dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def make_grad_scaler(self):
        enabled = self.prec == "amp" and self.device.type == "cuda"
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def step_with_scaler(self, loss):
        """Backward and optimizer step through the grad scaler (a no-op scaler outside CUDA amp)."""
        self.detect_anomaly(loss)
        self.model_zero_grad()
        self.scaler.scale(loss).backward()
        for name in self.get_model_names():
            if self._optims[name] is not None:
                self.scaler.step(self._optims[name])
        self.scaler.update()

    # ---------------------------------------------------------------- feature cache
    @property
    def feature_cache(self):
        """The persistent FeatureCache of TEST.FEATURE_CACHE, or None."""
        if "_feature_cache" not in self.__dict__:
            root = resolve_cache_dir(self.cfg.TEST.FEATURE_CACHE, self.cfg.OUTPUT_DIR)
            self._feature_cache = FeatureCache(root) if root else None
            if root:
                self.run_info.setdefault("feature_cache", {"folder": root})
        return self._feature_cache

    def cache_key(self):
        """What frozen features depend on besides their inputs: backbone, precision, device type."""
        if "_cache_key" not in self.__dict__:
            self._cache_key = {
                "backbone": backbone_identity(self.backbone),
                "precision": self.prec, "device": self.device.type,
            }
        return self._cache_key

    def image_cache_key(self, split):
        cfg = self.cfg
        return dict(self.cache_key(), kind="images", dataset=cfg.DATASET.NAME, split=split,
                    split_sha256=self.dm.dataset.split_sha256,
                    preprocessing={"size": list(cfg.INPUT.SIZE), "mean": list(cfg.INPUT.PIXEL_MEAN),
                                   "std": list(cfg.INPUT.PIXEL_STD), "interpolation": cfg.INPUT.INTERPOLATION,
                                   "crop": "resize shorter side, center crop", "no_transform": cfg.INPUT.NO_TRANSFORM,
                                   **self.test_transform_key()})

    def test_transform_key(self):
        """Test-time steps beyond resize, crop and normalization (none for most recipes)."""
        cfg = self.cfg
        if "brightness_enhancement" not in cfg.INPUT.TRANSFORMS or cfg.INPUT.NO_TRANSFORM:
            return {}
        return {"after_normalize": ["brightness_enhancement", cfg.INPUT.BRIGHTNESS_ALPHA, cfg.INPUT.BRIGHTNESS_BETA,
                                    cfg.INPUT.BRIGHTNESS_P]}

    def feature_width(self):
        """D, the width of the backbone's image and text features (what a feature cache file must hold)."""
        if "_feature_width" not in self.__dict__:
            width = getattr(self.backbone.model.visual, "output_dim", None)
            if not isinstance(width, int):
                width = self.encode_texts_now(["a"]).shape[1]
            self._feature_width = width
        return self._feature_width

    def encode_texts(self, texts, batch_size=256):
        """Normalized features (n, D) of frozen texts, from the feature cache when it holds them."""
        store = self.feature_cache
        if store is None:
            return self.encode_texts_now(texts, batch_size)
        feats, hit = store.text_features(dict(self.cache_key(), kind="texts"), texts,
                                         lambda t: self.encode_texts_now(t, batch_size), self.feature_width())
        logger.info(f"text features of {len(texts)} texts: {'from the feature cache' if hit else 'encoded'}")
        self.run_info["feature_cache"].setdefault("texts", []).append("hit" if hit else "miss")
        return feats.to(self.device)

    @torch.no_grad()
    def encode_texts_now(self, texts, batch_size=256):
        """Normalized features (n, D) of plain texts through the frozen text encoder.

        Texts are encoded in order of token count, so that each batch is cut to its own longest
        text (the text encoder's truncation) rather than to the longest of all.
        """
        ids = self.prompt_tokenizer(texts)
        order = torch.argsort((ids != self.text_encoder.pad_id).sum(dim=1), stable=True)
        feats = torch.empty(0)
        for start in range(0, len(texts), batch_size):
            index = order[start:start + batch_size]
            batch = ids[index].to(self.device)
            with self.autocast():
                out = F.normalize(self.text_encoder(self.text_encoder.embed(batch), batch).float(), dim=-1)
            if feats.numel() == 0:
                feats = torch.empty(len(texts), out.shape[1], device=out.device)
            feats[index.to(out.device)] = out
        return feats

    # ---------------------------------------------------------------- evaluation
    uses_frozen_image_features = False

    def class_text_features(self):
        """Normalized text features (n_cls, D) of the current classes."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images):
        with self.autocast():
            return F.normalize(self.image_encoder(images.to(self.device, non_blocking=True)).float(), dim=-1)

    @torch.no_grad()
    def encode_loader(self, loader, split):
        """Normalized features (n, D) of every image of a loader, in order; logs images/s."""
        feats, start = [], time.time()
        for batch in progress(loader, f"encode {split} images", min_total=10):
            images, _ = self.parse_batch_test(batch)
            feats.append(self.encode_images(images))
        out = torch.cat(feats)
        elapsed = time.time() - start
        logger.info(f"encoded {len(out)} {split} images in {elapsed:.1f}s ({len(out) / max(elapsed, 1e-9):.0f} images/s)")
        return out

    @torch.no_grad()
    def cached_image_features(self, split, loader):
        """Image features and labels of a split, encoded once per run, and once per backbone, precision and
        preprocessing across runs when TEST.FEATURE_CACHE is set."""
        cache = self.__dict__.setdefault("_image_feature_cache", {})
        if split not in cache:
            data = loader.dataset.data_source
            labels = torch.tensor([d.label for d in data], dtype=torch.long, device=self.device)
            store, split_file = self.feature_cache, getattr(self.dm.dataset, "split_file", None)
            if store is None or not split_file:
                feats = self.encode_loader(loader, split)
            else:
                # Rows are keyed by their path in the image folder, so the base and new halves fill one file.
                # Size and modification time too: an image changed under the same split is encoded again.
                folder = os.path.abspath(self.dm.dataset.image_dir)
                names = [[os.path.relpath(os.path.abspath(d.impath), folder), *file_stamp(d.impath)] for d in data]

                def encode(indices):
                    subset = torch.utils.data.Subset(loader.dataset, indices)
                    return self.encode_loader(torch.utils.data.DataLoader(
                        subset, batch_size=loader.batch_size, num_workers=loader.num_workers,
                        pin_memory=loader.pin_memory), split)

                feats, encoded = store.image_features(self.image_cache_key(split), names, encode, self.feature_width())
                feats = feats.to(self.device)
                state = "hit" if encoded == 0 else ("miss" if encoded == len(names) else "partial")
                logger.info(f"{split} image features: {len(names) - encoded} from the feature cache, {encoded} encoded")
                self.run_info["feature_cache"][split] = {"images": state, "encoded": encoded, "from_cache": len(names) - encoded}
            cache[split] = (feats, labels)
        return cache[split]

    @torch.no_grad()
    def description_ensemble(self):
        """Normalized mean description feature (n_cls, D) of each current class, encoded once per run."""
        if getattr(self, "_description_ensemble", None) is None:
            from clipkit.descriptions import descriptions_path, descriptions_source, file_record, load_descriptions
            from .zsclip import mean_features

            d = self.cfg.DATASET
            texts = load_descriptions(d.NAME, self.classnames, d.DESCRIPTIONS_DIR, d.DESCRIPTIONS_FILE)
            self._description_ensemble = mean_features(self.encode_texts([t for g in texts for t in g]), texts)
            self.run_info["fuse_descriptions"] = {
                "weight": self.cfg.TEST.FUSE_DESCRIPTIONS,
                "description_files": [file_record(d.NAME, descriptions_path(d.NAME, d.DESCRIPTIONS_DIR, d.DESCRIPTIONS_FILE),
                                                  descriptions_source(d.DESCRIPTIONS_DIR, d.DESCRIPTIONS_FILE))]}
        return self._description_ensemble

    def fuse(self, text):
        """Class features (n_cls, D), or (batch, n_cls, D) per image, mixed with the description ensemble
        at test time (TEST.FUSE_DESCRIPTIONS); unchanged in training and at weight 0."""
        weight = self.cfg.TEST.FUSE_DESCRIPTIONS
        if weight == 0 or (self.model.training and torch.is_grad_enabled()):  # a training step
            return text
        ensemble = self.description_ensemble().to(text.device)
        if weight == 1:
            return ensemble.expand_as(text)
        return F.normalize((1 - weight) * text + weight * ensemble, dim=-1)

    def run_record(self, results, **kwargs):
        record = super().run_record(results, **kwargs)
        if self.cfg.TEST.FUSE_DESCRIPTIONS:
            # Fusion makes another method in tables.
            record["method"] += f" + descriptions {self.cfg.TEST.FUSE_DESCRIPTIONS:g}"
        return record

    @torch.no_grad()
    def model_inference(self, images):
        text = self.fuse(self.class_text_features())
        return self.logit_scale * self.encode_images(images) @ text.t()

    def eval_outputs(self, split, loader):
        if not self.uses_frozen_image_features:
            yield from super().eval_outputs(split, loader)
            return
        feats, labels = self.cached_image_features(split, loader)
        with torch.no_grad():
            text = self.fuse(self.class_text_features())
            for start in range(0, len(feats), 4096):
                yield self.logit_scale * feats[start:start + 4096] @ text.t(), labels[start:start + 4096]
