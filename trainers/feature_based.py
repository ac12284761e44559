"""Shared wiring of the methods that learn on frozen image features (CLIP-Adapter, Tip-Adapter(-F), LP, LP++).

Such a method never needs the image encoder during training: it reads the features of
augmented views of the few-shot training images, of the validation images and of the
test images, all from the persistent feature cache when it holds them, so a second run
with the same backbone and split encodes no image. Each view's random transform is drawn
from a generator seeded by the image's path and the view's number, so the features are
the same with and without the cache, for every run and every seed.
"""
from __future__ import annotations

import hashlib
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset

from core.data import decode_resized, num_workers_for
from core.errors import UserError
from core.utils import logger
from datasets.catalog import readable_classname

from clipkit.feature_cache import views_key
from .base import CLIPTrainer, file_stamp

# How each view's randomness is drawn (part of the cache key: change it when the drawing changes).
VIEW_SEEDING = "torch.manual_seed(int(sha256(relative path NUL view)[:16], 16) >> 1) around the train transform"


def view_seed(name, view):
    return int(hashlib.sha256(f"{name}\0{view}".encode()).hexdigest()[:16], 16) >> 1


class AugmentedViews(Dataset):
    """(image, view) pairs of a list of images: item k is view k % views of image k // views, augmented
    with ``transform`` under that view's own seed. Images are decoded once, up front."""

    def __init__(self, data, names, transform, views, decode):
        self.names, self.transform, self.views = names, transform, views
        self.images = [decode(d) for d in data]

    def __len__(self):
        return len(self.images) * self.views

    def __getitem__(self, k):
        i, v = divmod(k, self.views)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(view_seed(self.names[i], v))
            return self.transform(self.images[i])


def add_feature_keys(node, views=1):
    """Keys every feature-based trainer has."""
    # Augmented views of each few-shot training image whose features the method learns from
    # (the train transform of INPUT.*; view v of an image is the same in every run).
    node.AUGMENT_VIEWS = views
    # Precision of the frozen image and text encoders: fp32, amp or fp16 (CUDA only).
    node.PREC = "fp32"


class FeatureTrainer(CLIPTrainer):
    """Fits a small model on cached features of the few-shot images; evaluates from cached test features.

    Subclasses build ``self.model`` (an nn.Module holding every learned tensor, saved as Dassl
    checkpoints) in ``build_head``, fit it in ``fit`` and give logits of features in ``logits``.
    """

    KIND = "feature-based"
    # Few-shot only: a model of the training classes' features cannot classify unseen classes.
    RECIPES = {"fewshot": "fewshot"}
    DEMO_RECIPES = {"fewshot": "demo"}
    uses_frozen_image_features = True
    model_name = "head"

    # ---------------------------------------------------------------- config
    def check_cfg(self, cfg):
        super().check_cfg(cfg)
        views = cfg.TRAINER[self.cfg_key].AUGMENT_VIEWS
        if views < 1:
            raise UserError(f"TRAINER.{self.cfg_key}.AUGMENT_VIEWS must be 1 or more, not {views}")
        if cfg.DATASET.SUBSAMPLE_CLASSES == "new":
            raise UserError(
                f"{cfg.TRAINER.NAME} learns on image features of the training classes and cannot classify "
                f"unseen ones; run it on DATASET.SUBSAMPLE_CLASSES all or base"
            )

    def views_needed(self):
        """Number of augmented views per training image the method reads."""
        return self.tcfg.AUGMENT_VIEWS

    # ---------------------------------------------------------------- model
    def build_model(self):
        self.setup_backbone()
        template = self.dataset_entry.template
        if "{}" not in template:
            raise UserError(f"template '{template}' has no '{{}}' for the class name")
        prompts = [template.format(readable_classname(c)) for c in self.classnames]
        logger.info(f"zero-shot classifier from the template, e.g. '{prompts[0]}'")
        self.text_features = self.encode_texts(prompts).float()
        n_train = len(self.dm.dataset.train_x) if self.dm.dataset.train_x else 0
        # The initial weights and the batch order depend on the run's seed only, not on what ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(max(self.cfg.SEED, 0))
            head = self.build_head(self.text_features.shape[1], len(self.classnames), n_train)
        self.model = head.to(self.device)
        self.register_model(self.model_name, self.model, None, None)
        self.generator = torch.Generator().manual_seed(max(self.cfg.SEED, 0))
        self.images_encoded, self.images_from_cache = {}, {}

    def build_head(self, dim, n_classes, n_train):
        """The nn.Module of learned tensors (shapes from the feature size, classes and training images)."""
        raise NotImplementedError

    def fit(self, views, labels, val):
        """Learn from ``views`` (V, N, D) with ``labels`` (N,); ``val`` = (features, labels) or None."""
        raise NotImplementedError

    def logits(self, feats):
        """Logits (n, C) of normalized image features (n, D)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- training
    def train(self, start_epoch=0, max_epoch=0):
        if not self.dm.dataset.train_x:
            raise UserError(f"the training split of {self.cfg.DATASET.NAME} is empty; nothing to learn from")
        start = time.time()
        views, labels = self.train_view_features()
        val = self.cached_image_features("val", self.val_loader) if self.val_loader is not None else None
        fit_start = time.time()
        with torch.enable_grad():
            self.fit(views, labels, val)
        logger.info(f"fitted {self.cfg.TRAINER.NAME} in {time.time() - fit_start:.2f}s "
                    f"({time.time() - start:.2f}s with the features)")
        self.run_info["fit_seconds"] = round(time.time() - fit_start, 3)
        self.save_model(self.cfg.OPTIM.MAX_EPOCH - 1, self.output_dir)

    def augmentation(self):
        """What the train transform of a view is (JSON-able): part of the cache key of the views."""
        c = self.cfg.INPUT
        return {"transforms": list(c.TRANSFORMS), "rrcrop_scale": list(c.RRCROP_SCALE), "size": list(c.SIZE),
                "interpolation": c.INTERPOLATION, "mean": list(c.PIXEL_MEAN), "std": list(c.PIXEL_STD),
                "no_transform": c.NO_TRANSFORM, "decoded_short_side": max(c.SIZE), "seeding": VIEW_SEEDING}

    @torch.no_grad()
    def train_view_features(self):
        """Features (V, N, D) of V augmented views of each training image, and labels (N,)."""
        data = self.dm.dataset.train_x
        views = self.views_needed()
        labels = torch.tensor([d.label for d in data], dtype=torch.long, device=self.device)
        folder = os.path.abspath(self.dm.dataset.image_dir)
        names = [os.path.relpath(os.path.abspath(d.impath), folder) for d in data]
        # Size and modification time too: an image changed under the same split is encoded again.
        stamped = [[name, *file_stamp(d.impath)] for name, d in zip(names, data)]
        size, interp = max(self.cfg.INPUT.SIZE), self.cfg.INPUT.INTERPOLATION

        def encode(indices):
            subset = AugmentedViews([data[i] for i in indices], [names[i] for i in indices], self.dm.tfm_train, views,
                                    lambda d: decode_resized(d.impath, size, interp, getattr(d, "source", "")))
            batch = self.cfg.DATALOADER.TEST.BATCH_SIZE
            loader = DataLoader(subset, batch_size=batch, num_workers=num_workers_for(self.cfg, -(-len(subset) // batch)))
            start, out = time.time(), []
            for images in loader:
                out.append(self.encode_images(images).cpu())
            feats = torch.cat(out)
            logger.info(f"encoded {len(feats)} augmented training views in {time.time() - start:.1f}s")
            return feats.view(len(indices), -1)  # (images, views * D)

        store, split_file = self.feature_cache, getattr(self.dm.dataset, "split_file", None)
        if store is None or not split_file:
            flat, encoded = encode(list(range(len(data)))), len(data)
        else:
            key = views_key(self.image_cache_key("train"), self.augmentation(), views)
            flat, encoded = store.image_features(key, stamped, encode, views * self.feature_width())
            self.run_info["feature_cache"]["train_views"] = {
                "images": "hit" if encoded == 0 else ("miss" if encoded == len(names) else "partial"),
                "views": views, "encoded": encoded * views, "from_cache": (len(names) - encoded) * views}
        logger.info(f"train image features ({len(names)} images x {views} augmented views): "
                    f"{(len(names) - encoded) * views} from the feature cache, {encoded * views} encoded")
        self.images_encoded["train"] = encoded * views
        self.images_from_cache["train"] = (len(names) - encoded) * views
        flat = flat.to(self.device).float()
        return flat.view(len(names), views, -1).transpose(0, 1).contiguous(), labels

    @torch.no_grad()
    def cached_image_features(self, split, loader):
        first = split not in self.__dict__.get("_image_feature_cache", {})
        out = super().cached_image_features(split, loader)
        if first:
            info = self.run_info.get("feature_cache", {}).get(split)
            encoded = info["encoded"] if info else len(out[0])
            self.images_encoded[split], self.images_from_cache[split] = encoded, len(out[0]) - encoded
        return out

    # Whether OPTIM.MAX_EPOCH is the method's schedule (CLIP-Adapter, Tip-Adapter-F); the others record none.
    trains_epochs = False

    def run_record(self, *args, **kwargs):
        record = super().run_record(*args, **kwargs)
        if not self.trains_epochs:
            record["epochs"] = None
        return record

    # ---------------------------------------------------------------- evaluation
    def test(self, split=None):
        results = super().test(split)
        encoded, cached = sum(self.images_encoded.values()), sum(self.images_from_cache.values())
        detail = ", ".join(f"{k} {self.images_encoded[k]}/{self.images_encoded[k] + self.images_from_cache[k]}"
                           for k in self.images_encoded)
        logger.info(f"images encoded this run: {encoded}; from the feature cache: {cached} (encoded/total: {detail})")
        self.run_info["images_encoded"] = encoded
        self.run_info["images_from_feature_cache"] = cached
        return results

    def eval_outputs(self, split, loader):
        feats, labels = self.cached_image_features(split, loader)
        with torch.no_grad():
            for start in range(0, len(feats), 4096):
                yield self.logits(feats[start:start + 4096].float()), labels[start:start + 4096]

    @torch.no_grad()
    def model_inference(self, images):
        return self.logits(self.encode_images(images))
