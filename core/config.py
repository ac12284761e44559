"""Default configuration, with Dassl's key names.

Every key a recipe may set is defined here (or by a trainer module's
``extend_cfg``) with a comment saying what it does. Merging a YAML file or
``KEY VALUE`` pairs that name an undefined key is an error.
"""
from __future__ import annotations

import os

import yaml
from yacs.config import CfgNode as CN

from .errors import UserError

_C = CN()
_C.VERSION = 1
# Folder for the log, results.json and checkpoints of one run.
_C.OUTPUT_DIR = "./output"
# Folder of an earlier run to resume from (its checkpoints are read); empty = none.
_C.RESUME = ""
# Random seed for sampling, initialization and data order; negative = do not seed.
_C.SEED = -1
# Where models run: auto (cuda if available, else cpu), cpu, cuda or cuda:N.
_C.DEVICE = "auto"
# Print the merged config and other details at start-up.
_C.VERBOSE = True
# CPU threads for torch; 0 = the MEDPROMPTCLIP_THREADS environment variable if set, else
# automatic: 1 for test-sized and demo backbones (more threads only add contention there),
# otherwise the cores this process may use (CPU affinity, cgroup quota) shared among the
# MEDPROMPTCLIP_PARALLEL_RUNS runs started side by side (default 1).
_C.NUM_THREADS = 0

###########################
# Input
###########################
_C.INPUT = CN()
# Image size (height, width) fed to the image encoder; empty = the backbone's own size.
_C.INPUT.SIZE = ()
# Resampling for resizing: bilinear, bicubic or nearest.
_C.INPUT.INTERPOLATION = "bicubic"
# Training transforms, applied in order; test always does resize, center crop, normalize.
_C.INPUT.TRANSFORMS = ("random_resized_crop", "random_flip", "normalize")
# Skip all transforms except tensor conversion.
_C.INPUT.NO_TRANSFORM = False
# Normalization mean and std per channel; empty = the backbone's preprocessing config.
_C.INPUT.PIXEL_MEAN = ()
_C.INPUT.PIXEL_STD = ()
# Scale range of random_resized_crop (fraction of the image area).
_C.INPUT.RRCROP_SCALE = (0.08, 1.0)
# brightness_enhancement (a transform name, the original SLO recipe's): after normalization, in
# training and at test, pixels become alpha * pixel + beta (8-bit, see core.data.BrightnessEnhancement),
# with probability P per image.
_C.INPUT.BRIGHTNESS_ALPHA = 1.5
_C.INPUT.BRIGHTNESS_BETA = 30.0
_C.INPUT.BRIGHTNESS_P = 0.5

###########################
# Dataset
###########################
_C.DATASET = CN()
# Folder holding one sub-folder per dataset (see datasets/catalog.py for the layout).
_C.DATASET.ROOT = ""
# Registered dataset name, e.g. ODIR or demo, or the name of a dataset declared in data
# (DATASET.ROOT/<name>/dataset.yaml, see datasets/declared.py).
_C.DATASET.NAME = ""
# The next four keys declare a dataset that is not in the catalog (datasets/catalog.py): set in its
# configs/datasets/<name>.yaml, or filled from a dataset.yaml given as --dataset-config-file.
# They are ignored while CLASSNAMES is empty.
# Class names in label order (the labels of data_split.json).
_C.DATASET.CLASSNAMES = ()
# Imaging modality, e.g. fundus or dermoscopy (a catalog modality gives the template).
_C.DATASET.MODALITY = ""
# Zero-shot prompt sentence; "{}" is the class name. Empty = the modality's template.
_C.DATASET.TEMPLATE = ""
# Descriptions file {classname: [descriptions]}; a relative path in a dataset YAML starts at that file's
# folder, one given as an override at the project folder.
# Empty = DESCRIPTIONS_DIR/<name>.json. Also for catalog datasets: e.g. the original release's
# templates/ODIR.json (raw keys such as age-related_macular_degeneration match the class names).
_C.DATASET.DESCRIPTIONS_FILE = ""
# Images per class sampled for training (few-shot); -1 = all training images.
_C.DATASET.NUM_SHOTS = -1
# Which classes to use: all, base (first half of the sorted labels) or new (second half).
_C.DATASET.SUBSAMPLE_CLASSES = "all"
# Folder of {classname: [descriptions]} files named <dataset>.json; relative paths start at the project folder.
# original:<folder> = the original release's templates/ folder, read with its file names
# (ODIR_3x200 reads ODIR.json, SkinCancer reads Skincancer.json).
_C.DATASET.DESCRIPTIONS_DIR = "llm_descriptions"

###########################
# Data loaders
###########################
_C.DATALOADER = CN()
# Worker processes per loader (0 = load in the main process); -1 = automatic: the cores left
# beside the run's threads, at most 8 and at most one per batch.
_C.DATALOADER.NUM_WORKERS = -1
_C.DATALOADER.TRAIN_X = CN()
# Sampler for the labelled training set: RandomSampler or SequentialSampler.
_C.DATALOADER.TRAIN_X.SAMPLER = "RandomSampler"
# Batch size for training.
_C.DATALOADER.TRAIN_X.BATCH_SIZE = 32
_C.DATALOADER.TEST = CN()
# Sampler for val/test sets.
_C.DATALOADER.TEST.SAMPLER = "SequentialSampler"
# Batch size for evaluation.
_C.DATALOADER.TEST.BATCH_SIZE = 100

###########################
# Model
###########################
_C.MODEL = CN()
# A checkpoint file whose tensors initialize the model's learnable parameters; empty = none.
_C.MODEL.INIT_WEIGHTS = ""
_C.MODEL.BACKBONE = CN()
# Backbone: alias (tiny-clip, biomedclip, pmc-clip, ViT-B/16, ...), open_clip model name,
# hf-hub:<repo id>, a local folder holding open_clip_config.json and weights, or an
# OpenAI-format weights file (TorchScript or state dict; architecture read from its shapes).
_C.MODEL.BACKBONE.NAME = "demo-clip"
# open_clip pretrained tag or weights file for a plain open_clip model name, or pmc-clip's
# weights file (pmc_vit_l_14_weights.pt) instead of the hub download; empty = the alias default.
_C.MODEL.BACKBONE.PRETRAINED = ""
# Folder for downloaded weights (open_clip/Hugging Face cache); empty = their default cache.
_C.MODEL.BACKBONE.CACHE_DIR = ""

###########################
# Optimization
###########################
_C.OPTIM = CN()
# Optimizer: sgd, adam or adamw.
_C.OPTIM.NAME = "sgd"
# Base learning rate.
_C.OPTIM.LR = 0.002
# Weight decay (L2 for sgd/adam, decoupled for adamw).
_C.OPTIM.WEIGHT_DECAY = 5e-4
# SGD momentum, dampening and Nesterov switch.
_C.OPTIM.MOMENTUM = 0.9
_C.OPTIM.SGD_DAMPNING = 0.0
_C.OPTIM.SGD_NESTEROV = False
# Adam/AdamW betas.
_C.OPTIM.ADAM_BETA1 = 0.9
_C.OPTIM.ADAM_BETA2 = 0.999
# Learning-rate schedule: cosine, single_step, multi_step or constant.
_C.OPTIM.LR_SCHEDULER = "single_step"
# Step size(s) in epochs for single_step (int) and multi_step (list); -1 or empty = never.
_C.OPTIM.STEPSIZE = (-1,)
# Multiplicative decay at each step.
_C.OPTIM.GAMMA = 0.1
# Number of training epochs.
_C.OPTIM.MAX_EPOCH = 10
# Warm-up epochs before the schedule starts (0 = none).
_C.OPTIM.WARMUP_EPOCH = 0
# Warm-up type: constant (fixed WARMUP_CONS_LR) or linear (from WARMUP_MIN_LR up to LR).
_C.OPTIM.WARMUP_TYPE = "linear"
_C.OPTIM.WARMUP_CONS_LR = 1e-5
_C.OPTIM.WARMUP_MIN_LR = 1e-5
# Restart the schedule's epoch count after warm-up (Dassl's behaviour when True).
_C.OPTIM.WARMUP_RECOUNT = True

###########################
# Training
###########################
_C.TRAIN = CN()
# Save a checkpoint every this many epochs (0 = only the last epoch).
_C.TRAIN.CHECKPOINT_FREQ = 0
# Log every this many batches.
_C.TRAIN.PRINT_FREQ = 10

###########################
# Testing
###########################
_C.TEST = CN()
# Evaluator registered in core.evaluation.
_C.TEST.EVALUATOR = "Classification"
# Report per-class accuracy in the log and results.json.
_C.TEST.PER_CLASS_RESULT = False
# Compute and save the confusion matrix (cmat.json beside results.json).
_C.TEST.COMPUTE_CMAT = False
# Skip evaluation after training.
_C.TEST.NO_TEST = False
# Test-time fusion with the description ensemble: each class feature becomes the normalized mix
# (1 - w) * learned-prompt feature + w * mean description feature (DATASET descriptions file).
# 0 = the learned prompts alone, 1 = the description ensemble alone.
_C.TEST.FUSE_DESCRIPTIONS = 0.0
# Split evaluated: test or val.
_C.TEST.SPLIT = "test"
# Which weights are evaluated after training: last_step.
_C.TEST.FINAL_MODEL = "last_step"
# Folder where frozen image features of evaluated splits and frozen text features (description
# targets, zero-shot prompts) are kept and shared by runs, keyed by backbone, precision,
# preprocessing and inputs; "auto" = feature_cache/ in the output root (the top folder of
# OUTPUT_DIR under the working directory, else OUTPUT_DIR); "" = do not keep features.
_C.TEST.FEATURE_CACHE = "auto"

###########################
# Trainer
###########################
_C.TRAINER = CN()
# Registered trainer name (see `python train.py --list`).
_C.TRAINER.NAME = ""


def get_cfg_default():
    return _C.clone()


def _check_value_type(key, value, default):
    if isinstance(default, bool) and not isinstance(value, bool):
        raise UserError(f"config key {key} takes true/false, not {value!r}")


# Recipe-file keys read by merge_from_file itself (not config keys):
# _BASE_: a recipe file (relative to this one) merged first; this file's keys then override it.
# _PER_DATASET_: {dataset name: {DOTTED.KEY: value}}: the row of DATASET.NAME (set by the dataset
# YAML, merged before the recipe) is merged after this file's own keys; other datasets keep them.
RECIPE_KEYS = ("_BASE_", "_PER_DATASET_")


def _read_yaml(path):
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must hold a mapping of keys, not {type(loaded).__name__}")
    return loaded


def _merge_mapping(cfg, mapping, where):
    try:
        cfg.merge_from_other_cfg(CN(mapping))
    except KeyError as e:
        key = str(e).strip("'\"")
        raise UserError(f"{where}: {key} (check the spelling against core/config.py and the trainer's extend_cfg)") from None
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def _nested(row, where):
    """{"OPTIM.LR": 0.1} -> {"OPTIM": {"LR": 0.1}}."""
    nested = {}
    for key, value in row.items():
        node = nested
        parts = str(key).split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"{where}: {key} repeats a key")
        node[parts[-1]] = value
    return nested


def merge_from_file(cfg, path, _chain=()):
    """Merge a YAML recipe, naming the file and key in any error.

    Follows ``_BASE_`` (merged first) and applies the ``_PER_DATASET_`` row of
    cfg.DATASET.NAME after the file's own keys.
    """
    loaded = _read_yaml(path)
    base = loaded.pop("_BASE_", None)
    table = loaded.pop("_PER_DATASET_", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise UserError(f"config file {path}: _BASE_ must be a file name, not {base!r}")
        base_path = os.path.join(os.path.dirname(path), base)
        if os.path.abspath(base_path) in _chain or os.path.abspath(base_path) == os.path.abspath(path):
            raise UserError(f"config file {path}: _BASE_ {base} includes itself")
        merge_from_file(cfg, base_path, _chain + (os.path.abspath(path),))
    _merge_mapping(cfg, loaded, f"config file {path}")
    if table is None:
        return
    if not isinstance(table, dict):
        raise UserError(f"config file {path}: _PER_DATASET_ must map dataset names to keys")
    row = table.get(cfg.DATASET.NAME)
    if row is None:
        return
    where = f"config file {path}, _PER_DATASET_ {cfg.DATASET.NAME}"
    if not isinstance(row, dict):
        raise UserError(f"{where}: must map DOTTED.KEYS to values")
    _merge_mapping(cfg, _nested(row, where), where)


def _lookup(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def merge_from_list(cfg, opts):
    """Merge trailing ``KEY VALUE`` pairs from the command line."""
    if len(opts) % 2:
        raise UserError(f"config overrides must be KEY VALUE pairs; '{opts[-1]}' has no value")
    for key, value in zip(opts[0::2], opts[1::2]):
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, CN) or part not in node:
                raise UserError(f"unknown config key {key}")
            node = node[part]
        if not isinstance(node, CN) or parts[-1] not in node:
            raise UserError(f"unknown config key {key}")
    # A whole number for a real-valued key ("TEST.FUSE_DESCRIPTIONS 1") is that real number.
    opts = [value + ".0" if i % 2 and isinstance(value, str) and value.strip().lstrip("+-").isdigit()
            and isinstance(_lookup(cfg, opts[i - 1]), float) else value for i, value in enumerate(opts)]
    try:
        cfg.merge_from_list(list(opts))
    except (ValueError, AssertionError, KeyError) as e:
        raise UserError(f"bad config override: {e}") from None
