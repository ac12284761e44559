"""What every CLIP trainer shares: backbone loading, precision, cached evaluation."""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from core.engine import TrainerX
from core.errors import UserError
from core.utils import logger
from datasets.catalog import get_entry

from ._backbones import load_backbone
from ._prompt_layer import ImageEncoder, PromptTokenizer, TextEncoder

PRECISIONS = ("fp32", "amp", "fp16")


class CLIPTrainer(TrainerX):
    """A TrainerX whose model is built around one frozen open_clip backbone.

    Subclasses set ``cfg_key`` (their node under TRAINER) and implement
    ``build_model``. Those whose logits depend only on frozen image features
    and per-class text features implement ``class_text_features`` and get
    evaluation that encodes each image once per run.
    """

    cfg_key = ""

    @property
    def tcfg(self):
        return self.cfg.TRAINER[self.cfg_key] if self.cfg_key else None

    @property
    def prec(self):
        return self.tcfg.PREC if self.tcfg is not None and "PREC" in self.tcfg else "fp32"

    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        node = cfg.TRAINER[self.cfg_key] if self.cfg_key else None
        if node is not None and "PREC" in node and node.PREC not in PRECISIONS:
            raise UserError(f"TRAINER.{self.cfg_key}.PREC must be one of {', '.join(PRECISIONS)}, not '{node.PREC}'")

    # ---------------------------------------------------------------- data
    def build_data_loader(self):
        cfg = self.cfg
        try:
            self.dataset_entry = get_entry(cfg.DATASET.NAME)
        except KeyError as e:
            raise UserError(e.args[0]) from None
        self.backbone = load_backbone(
            cfg.MODEL.BACKBONE.NAME, cfg.MODEL.BACKBONE.PRETRAINED, cfg.MODEL.BACKBONE.CACHE_DIR, device="cpu"
        )
        self.fill_input_cfg()
        super().build_data_loader()
        self.classnames = list(self.dm.dataset.classnames)

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
    def checkpoint_settings(self):
        settings = super().checkpoint_settings()
        settings["MODEL.BACKBONE.NAME"] = self.cfg.MODEL.BACKBONE.NAME
        settings["MODEL.BACKBONE.PRETRAINED"] = self.cfg.MODEL.BACKBONE.PRETRAINED
        settings.update(self.tensor_settings())
        return settings

    def tensor_settings(self):
        """{config key: value} of the settings that shape the learnable tensors.

        Context sizes are the numbers of tokens actually learned: CTX_INIT's word
        count when it is set, else N_CTX.
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

    @torch.no_grad()
    def encode_texts(self, texts, batch_size=256):
        """Normalized features (n, D) of plain texts through the frozen text encoder."""
        feats = []
        for start in range(0, len(texts), batch_size):
            ids = self.prompt_tokenizer(texts[start:start + batch_size]).to(self.device)
            with self.autocast():
                feats.append(F.normalize(self.backbone.model.encode_text(ids).float(), dim=-1))
        return torch.cat(feats)

    # ---------------------------------------------------------------- evaluation
    uses_frozen_image_features = False

    def class_text_features(self):
        """Normalized text features (n_cls, D) of the current classes."""
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, images):
        with self.autocast():
            return F.normalize(self.image_encoder(images.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def cached_image_features(self, split, loader):
        """Image features and labels of a split, encoded once per run."""
        cache = self.__dict__.setdefault("_image_feature_cache", {})
        if split not in cache:
            feats, labels = [], []
            for batch in loader:
                images, y = self.parse_batch_test(batch)
                feats.append(self.encode_images(images))
                labels.append(y)
            cache[split] = (torch.cat(feats), torch.cat(labels))
        return cache[split]

    @torch.no_grad()
    def model_inference(self, images):
        text = self.class_text_features()
        return self.logit_scale * self.encode_images(images) @ text.t()

    def eval_outputs(self, split, loader):
        if not self.uses_frozen_image_features:
            yield from super().eval_outputs(split, loader)
            return
        feats, labels = self.cached_image_features(split, loader)
        with torch.no_grad():
            text = self.class_text_features()
            for start in range(0, len(feats), 4096):
                yield self.logit_scale * feats[start:start + 4096] @ text.t(), labels[start:start + 4096]
