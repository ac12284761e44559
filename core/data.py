"""Datasets, transforms and loaders with Dassl's names and semantics."""
from __future__ import annotations

import json
import math
import os
import random
import warnings
from collections import defaultdict

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from .errors import UserError
from .folder_guard import FolderGuard  # noqa: F401  (datasets import it from here)
from .registry import Registry
from .utils import logger, remove_stale_temp_files, write_json_atomic

DATASET_REGISTRY = Registry("dataset")

# Folder beside a dataset's split file that holds its few-shot caches.
FEWSHOT_DIR = "split_fewshot"


class Datum:
    """One sample: image path, label, domain and class name.

    ``source`` names the file that lists the sample (a split file or a few-shot
    cache), so that an unreadable image can be traced to it.
    """

    __slots__ = ("impath", "label", "domain", "classname", "source")

    def __init__(self, impath="", label=0, domain=0, classname="", source=""):
        self.impath = impath
        self.label = int(label)
        self.domain = int(domain)
        self.classname = classname
        self.source = source

    def __repr__(self):
        return f"Datum({self.impath!r}, label={self.label}, classname={self.classname!r})"


class DatasetBase:
    """Holds the train/val/test lists of :class:`Datum` and their class names."""

    dataset_dir = ""

    def __init__(self, train_x=None, train_u=None, val=None, test=None, classnames=None):
        self._train_x = train_x or []
        self._train_u = train_u
        self._val = val or []
        self._test = test or []
        if classnames is None:
            self._lab2cname, self._classnames = self.get_lab2cname(self._train_x + self._val + self._test)
        else:
            self._classnames = list(classnames)
            self._lab2cname = dict(enumerate(self._classnames))
        self._num_classes = len(self._classnames)

    @property
    def train_x(self):
        return self._train_x

    @property
    def train_u(self):
        return self._train_u

    @property
    def val(self):
        return self._val

    @property
    def test(self):
        return self._test

    @property
    def lab2cname(self):
        return self._lab2cname

    @property
    def classnames(self):
        return self._classnames

    @property
    def num_classes(self):
        return self._num_classes

    @staticmethod
    def get_num_classes(data_source):
        return max(item.label for item in data_source) + 1

    @staticmethod
    def get_lab2cname(data_source):
        mapping = {item.label: item.classname for item in data_source}
        labels = sorted(mapping)
        return mapping, [mapping[label] for label in labels]

    @staticmethod
    def split_dataset_by_label(data_source):
        output = defaultdict(list)
        for item in data_source:
            output[item.label].append(item)
        return output

    def generate_fewshot_dataset(self, *data_sources, num_shots=-1, repeat=False, seed=None):
        """Sample ``num_shots`` items per class from each data source.

        Sampling uses its own generator seeded with ``seed`` so that the same
        seed gives the same subset whatever else consumed random numbers.
        """
        if num_shots < 1:
            return data_sources[0] if len(data_sources) == 1 else data_sources
        rng = random.Random(seed)
        output = []
        for data_source in data_sources:
            by_label = self.split_dataset_by_label(data_source)
            sampled = []
            for label in sorted(by_label):
                items = by_label[label]
                if len(items) >= num_shots:
                    sampled.extend(rng.sample(items, num_shots))
                elif repeat:
                    sampled.extend(rng.choices(items, k=num_shots))
                else:
                    sampled.extend(items)
            output.append(sampled)
        return output[0] if len(output) == 1 else output

    @staticmethod
    def subsample_classes(*args, subsample="all", labels=None):
        """Keep the base (first ceil(n/2) sorted labels) or new classes, relabelled from 0.

        labels: every label of the dataset; by default the labels that occur in ``args``.
        """
        subsample = subsample.lower()
        if subsample not in ("all", "base", "new"):
            raise UserError(f"DATASET.SUBSAMPLE_CLASSES must be all, base or new, not '{subsample}'")
        if subsample == "all":
            return args
        labels = sorted(labels if labels is not None else {item.label for dataset in args for item in dataset})
        if len(labels) < 4:
            warnings.warn(
                f"base-to-new split of a dataset with {len(labels)} classes is degenerate "
                f"(base and new hold {math.ceil(len(labels) / 2)} and {len(labels) // 2} class(es))",
                stacklevel=2,
            )
        m = math.ceil(len(labels) / 2)
        selected = labels[:m] if subsample == "base" else labels[m:]
        relabeler = {y: i for i, y in enumerate(selected)}
        output = []
        for dataset in args:
            output.append([
                Datum(item.impath, relabeler[item.label], item.domain, item.classname, item.source)
                for item in dataset if item.label in relabeler
            ])
        return output


def subsample_classnames(classnames, subsample):
    """The class names a base/new/all subsample keeps, in their new label order."""
    n = len(classnames)
    m = math.ceil(n / 2)
    subsample = subsample.lower()
    if subsample == "base":
        return list(classnames[:m])
    if subsample == "new":
        return list(classnames[m:])
    return list(classnames)


def load_or_sample_fewshot(dataset, path, train, val, num_shots, seed, source_digest="", *, image_dir):
    """Few-shot train/val lists, cached as JSON at ``path`` with paths relative to ``image_dir``.

    The cache is written atomically, so two runs racing on the same file
    both end with a complete file; sampling is deterministic per seed, so
    both write the same content. ``source_digest`` identifies the split the
    sample came from: a cache of another split is sampled again, and so is one
    whose rows are not rows of ``train``/``val`` with the same label. A row
    leading outside ``image_dir`` is an error naming it.
    """
    remove_stale_temp_files(os.path.dirname(path), depth=0)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                cached = json.load(f)
            if not isinstance(cached, dict) or cached.get("source_digest", "") != source_digest:
                raise ValueError("the split file changed since this sample was drawn")
            if cached.get("num_shots") != num_shots or cached.get("seed") != seed:
                raise ValueError(f"it holds another sample (shots {cached.get('num_shots')}, seed {cached.get('seed')})")
            guard = FolderGuard(image_dir)
            lists = []
            for key, items in (("train", train), ("val", val)):
                known = {(d.impath, d.label, d.classname) for d in items}
                rows = cached[key]
                if not isinstance(rows, list):
                    raise ValueError(f"'{key}' is not a list")
                data = []
                for i, row in enumerate(rows):
                    rel, label, classname = row
                    if not isinstance(rel, str):
                        raise ValueError(f"{key} row {i} is not [relative_path, label, classname]")
                    impath = guard.resolve(rel)
                    if impath is None:
                        raise UserError(
                            f"few-shot cache {path}: {key} row {i} ({str(rel)[:120]!r}) leads outside the image folder "
                            f"{image_dir}; delete the cache file (it is sampled again from the split)"
                        )
                    if (impath, label, classname) not in known:
                        raise ValueError(f"{key} row {i} ({rel}, label {label}) is not a {key} row of the split")
                    data.append(Datum(impath, label, 0, classname, source=path))
                lists.append(data)
            return lists[0], lists[1]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            logger.info(f"few-shot cache {path} not used ({e}); sampling again")
    train_fs = dataset.generate_fewshot_dataset(train, num_shots=num_shots, seed=seed)
    val_fs = dataset.generate_fewshot_dataset(val, num_shots=min(num_shots, 4), seed=seed)
    rel = lambda items: [[os.path.relpath(d.impath, image_dir), d.label, d.classname] for d in items]
    try:
        write_json_atomic(path, {
            "num_shots": num_shots, "seed": seed, "source_digest": source_digest,
            "train": rel(train_fs), "val": rel(val_fs),
        }, indent=None)
        logger.info(f"saved few-shot split to {path}")
    except OSError as e:
        logger.info(f"could not cache the few-shot split at {path} ({e}); continuing without cache")
        return train_fs, val_fs
    listed = lambda items: [Datum(d.impath, d.label, d.domain, d.classname, source=path) for d in items]
    return listed(train_fs), listed(val_fs)


INTERPOLATIONS = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


class BrightnessEnhancement:
    """The original code's brightness step, applied after normalization as its SLO recipe orders it.

    The normalized tensor (3, H, W) is read as 8-bit pixels the way its numpy cast does (x 255,
    truncated, wrapped modulo 256), mapped to round(alpha * pixel + beta) clipped to 0..255 (OpenCV's
    convertScaleAbs) and divided by 255. The model then sees values in [0, 1], not normalized ones:
    that is what the published SLO numbers were measured on. Applied with probability ``p``.
    """

    def __init__(self, alpha, beta, p):
        self.alpha, self.beta, self.p = float(alpha), float(beta), float(p)

    def __call__(self, img):
        if self.p < 1 and torch.rand(()).item() >= self.p:
            return img
        pixels = torch.remainder(torch.trunc(img * 255).to(torch.int64), 256).to(torch.float64)
        out = torch.clamp(torch.round(torch.abs(self.alpha * pixels + self.beta)), 0, 255)
        return (out / 255.0).to(img.dtype)

    def __repr__(self):
        return f"BrightnessEnhancement(alpha={self.alpha}, beta={self.beta}, p={self.p})"


def build_transform(cfg, is_train=True):
    """Dassl's transforms: train = random resized crop, flip, normalize; test = resize, center crop, normalize."""
    if cfg.INPUT.INTERPOLATION not in INTERPOLATIONS:
        raise UserError(f"INPUT.INTERPOLATION must be one of {', '.join(INTERPOLATIONS)}, not '{cfg.INPUT.INTERPOLATION}'")
    interp = INTERPOLATIONS[cfg.INPUT.INTERPOLATION]
    size = tuple(cfg.INPUT.SIZE)
    if len(size) != 2:
        raise UserError(f"INPUT.SIZE must be (height, width), not {size}")
    to_rgb = T.Lambda(lambda im: im.convert("RGB"))
    if cfg.INPUT.NO_TRANSFORM:
        return T.Compose([to_rgb, T.Resize(size, interpolation=interp), T.ToTensor()])
    if len(cfg.INPUT.PIXEL_MEAN) != 3 or len(cfg.INPUT.PIXEL_STD) != 3 or min(cfg.INPUT.PIXEL_STD) <= 0:
        raise UserError(
            f"INPUT.PIXEL_MEAN and INPUT.PIXEL_STD need three values each, std above 0 "
            f"(got {tuple(cfg.INPUT.PIXEL_MEAN)} and {tuple(cfg.INPUT.PIXEL_STD)})"
        )
    normalize = T.Normalize(mean=list(cfg.INPUT.PIXEL_MEAN), std=list(cfg.INPUT.PIXEL_STD))
    known = {"random_resized_crop", "random_flip", "center_crop", "normalize", "brightness_enhancement"}
    unknown = [t for t in cfg.INPUT.TRANSFORMS if t not in known]
    if unknown:
        raise UserError(f"unknown INPUT.TRANSFORMS {unknown}; available: {', '.join(sorted(known))}")
    # The original applies it in training and at test, after normalization.
    after = [BrightnessEnhancement(cfg.INPUT.BRIGHTNESS_ALPHA, cfg.INPUT.BRIGHTNESS_BETA, cfg.INPUT.BRIGHTNESS_P)] \
        if "brightness_enhancement" in cfg.INPUT.TRANSFORMS else []
    if not is_train:
        steps = [to_rgb, T.Resize(max(size), interpolation=interp), T.CenterCrop(size), T.ToTensor()]
        return T.Compose(steps + [normalize] + after)
    steps = [to_rgb]
    if "random_resized_crop" in cfg.INPUT.TRANSFORMS:
        steps.append(T.RandomResizedCrop(size, scale=tuple(cfg.INPUT.RRCROP_SCALE), interpolation=interp))
    else:
        steps += [T.Resize(max(size), interpolation=interp), T.CenterCrop(size)]
    if "random_flip" in cfg.INPUT.TRANSFORMS:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ToTensor())
    if "normalize" in cfg.INPUT.TRANSFORMS:
        steps.append(normalize)
    return T.Compose(steps + after)


def read_image(path, source=""):
    """The image at ``path`` as RGB; ``source`` is the file listing it (named in errors)."""
    listed = f"listed in {source}" if source else "listed in data_split.json"
    if source and os.path.basename(os.path.dirname(source)) == FEWSHOT_DIR:
        fix = f"restore or replace the image, or remove its row from data_split.json and delete {source}"
    else:
        fix = f"restore or replace the image, or remove its row from {source or 'data_split.json'}"
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image file missing: {path} ({listed}); {fix}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise UserError(f"cannot read image {path} ({type(e).__name__}; {listed}); {fix}") from None


PIL_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def decode_resized(path, short_side, interpolation, source=""):
    """An image decoded and, if larger, resized so that its shorter side is ``short_side`` (as T.Resize does)."""
    img = read_image(path, source)
    if short_side and min(img.size) > short_side:
        w, h = img.size
        long_side = int(short_side * max(w, h) / min(w, h))
        size = (short_side, long_side) if w <= h else (long_side, short_side)
        img = img.resize(size, resample=PIL_RESAMPLE.get(interpolation, Image.BICUBIC))
    return img


class DatasetWrapper(Dataset):
    """Yields Dassl's batch dict: img, label, domain, impath, index.

    With ``keep_decoded`` (short_side, interpolation) every image is decoded once, up
    front, and kept in memory at that size; the transform (augmentation) still runs on
    every access. Loader workers forked afterwards share the decoded images.
    """

    def __init__(self, data_source, transform, keep_decoded=None):
        self.data_source = data_source
        self.transform = transform
        self.decoded = None
        if keep_decoded is not None:
            from concurrent.futures import ThreadPoolExecutor

            from .utils import cores_per_run

            # Decoding releases the GIL: threads use the run's cores.
            with ThreadPoolExecutor(max_workers=cores_per_run()) as pool:
                self.decoded = list(pool.map(
                    lambda d: decode_resized(d.impath, *keep_decoded, getattr(d, "source", "")), data_source))

    def __len__(self):
        return len(self.data_source)

    def __getitem__(self, idx):
        item = self.data_source[idx]
        img = self.decoded[idx] if self.decoded is not None else read_image(item.impath, getattr(item, "source", ""))
        return {
            "img": self.transform(img),
            "label": item.label,
            "domain": item.domain,
            "impath": item.impath,
            "index": idx,
        }


# Few-shot training sets up to this many images are decoded once per run and kept in memory.
MAX_DECODED_IMAGES = 20_000


def num_workers_for(cfg, num_batches):
    """DATALOADER.NUM_WORKERS, or for -1 the cores of this run less the main process (at most 8), and
    none for a single batch (a worker would only add its start-up time)."""
    from .utils import cores_per_run

    n = cfg.DATALOADER.NUM_WORKERS
    if n < -1:
        raise UserError(f"DATALOADER.NUM_WORKERS must be -1 (automatic), 0 or more, not {n}")
    if n == -1:
        n = min(8, cores_per_run() - 1) if num_batches > 1 else 0
    # More workers than cores only adds start-up time.
    return min(n, os.cpu_count() or 1)


def uses_cuda(cfg):
    return str(cfg.DEVICE).strip().lower() != "cpu" and torch.cuda.is_available()


def build_data_loader(cfg, data_source, batch_size, transform, is_train):
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, not {batch_size} (DATALOADER.TRAIN_X/TEST.BATCH_SIZE)")
    sampler_name = cfg.DATALOADER.TRAIN_X.SAMPLER if is_train else cfg.DATALOADER.TEST.SAMPLER
    if sampler_name not in ("RandomSampler", "SequentialSampler"):
        raise UserError(f"unknown sampler '{sampler_name}'; use RandomSampler or SequentialSampler")
    shuffle = sampler_name == "RandomSampler"
    drop_last = is_train and len(data_source) >= batch_size
    num_batches = len(data_source) // batch_size if drop_last else math.ceil(len(data_source) / batch_size)
    workers = num_workers_for(cfg, num_batches)
    keep_decoded = None
    if is_train and cfg.DATASET.NUM_SHOTS >= 1 and len(data_source) <= MAX_DECODED_IMAGES:
        # The same few images are read every epoch: decode them once, at the shorter side the transforms
        # resize to (never enlarged), and augment the kept copy each time.
        keep_decoded = (max(cfg.INPUT.SIZE) if cfg.INPUT.SIZE else None, cfg.INPUT.INTERPOLATION)
    return DataLoader(
        DatasetWrapper(data_source, transform, keep_decoded),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=uses_cuda(cfg),
        # Training loaders are iterated every epoch: keep their workers instead of starting new ones.
        persistent_workers=is_train and workers > 0,
    )


class DataManager:
    """Builds the dataset named by ``DATASET.NAME`` and its train/val/test loaders."""

    def __init__(self, cfg, custom_tfm_train=None, custom_tfm_test=None, dataset=None):
        self.dataset = dataset if dataset is not None else build_dataset(cfg)
        tfm_train = custom_tfm_train or build_transform(cfg, is_train=True)
        tfm_test = custom_tfm_test or build_transform(cfg, is_train=False)
        self.tfm_train, self.tfm_test = tfm_train, tfm_test
        ds = self.dataset
        self.train_loader_x = (
            build_data_loader(cfg, ds.train_x, cfg.DATALOADER.TRAIN_X.BATCH_SIZE, tfm_train, True) if ds.train_x else None
        )
        self.val_loader = build_data_loader(cfg, ds.val, cfg.DATALOADER.TEST.BATCH_SIZE, tfm_test, False) if ds.val else None
        self.test_loader = build_data_loader(cfg, ds.test, cfg.DATALOADER.TEST.BATCH_SIZE, tfm_test, False) if ds.test else None
        self._num_classes = ds.num_classes
        self._lab2cname = ds.lab2cname
        self._classnames = ds.classnames

    @property
    def num_classes(self):
        return self._num_classes

    @property
    def lab2cname(self):
        return self._lab2cname

    @property
    def classnames(self):
        return self._classnames


def build_dataset(cfg):
    return DATASET_REGISTRY.get(cfg.DATASET.NAME)(cfg)
