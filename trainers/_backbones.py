"""Backbone factory: every CLIP model is built by ``open_clip.create_model``.

``MODEL.BACKBONE.NAME`` may be
  - an alias below (``biomedclip``, ``pmc-clip``, ``ViT-B/16``, ``tiny-clip``, ...),
  - an open_clip architecture name with ``MODEL.BACKBONE.PRETRAINED`` a tag or weights file,
  - ``hf-hub:<repo id>``,
  - a local folder holding ``open_clip_config.json`` and the weights (a hub snapshot).
The tiny test backbones are open_clip model configs kept in ``configs/backbones``,
built through the same call with random weights.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import socket
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass
from urllib.parse import urlparse

import torch

from core.errors import UserError
from core.utils import logger

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE_CONFIG_DIR = os.path.join(PROJECT_DIR, "configs", "backbones")

# alias -> how to build it. "config": a JSON under configs/backbones (random init
# unless "weights" names a file next to it); "hub": an hf-hub id; "arch"+"pretrained":
# an open_clip architecture and pretrained tag.
ALIASES = {
    "tiny-clip": {"config": "tiny-clip.json"},
    "tiny-bert-clip": {"config": "tiny-bert-clip.json"},
    # BiomedCLIP's shape (timm ViT image tower, BERT text tower) at test size.
    "tiny-timm-clip": {"config": "tiny-timm-clip.json"},
    "demo-clip": {"config": "demo-clip.json", "weights": "demo-clip/demo-clip.safetensors"},
    "pmc-clip": {"hub": "hf-hub:ryanyip7777/pmc_vit_l_14"},
    "biomedclip": {"hub": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"},
    "vit-b/16": {"arch": "ViT-B-16-quickgelu", "pretrained": "openai"},
    "vit-l/14": {"arch": "ViT-L-14-quickgelu", "pretrained": "openai"},
}
ALIASES["clip-vit-b-16"] = ALIASES["vit-b/16"]
ALIASES["clip-vit-l-14"] = ALIASES["vit-l/14"]
ALIASES["pmc_vit_l_14"] = ALIASES["pmc-clip"]


@dataclass
class Backbone:
    """A frozen open_clip model with its tokenizer and preprocessing facts."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    text_kind: str  # "native" (open_clip transformer) or "hf" (Hugging Face encoder)
    image_size: tuple
    mean: tuple
    std: tuple
    interpolation: str
    context_length: int


def _hub_reachable(timeout=3.0):
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _hf_cached(repo_id, filenames, cache_dir=None):
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _require_hub_files(display, repo_id, cache_dir):
    """Fail within seconds, naming the files, if a hub model is neither cached nor downloadable."""
    have_cfg = _hf_cached(repo_id, ["open_clip_config.json"], cache_dir)
    have_weights = _hf_cached(repo_id, WEIGHT_FILES, cache_dir)
    if have_cfg and have_weights:
        return
    if _hub_reachable():
        return
    raise UserError(
        f"backbone '{display}': weights of hf-hub:{repo_id} are not on disk and the Hugging Face hub cannot be "
        f"reached; download open_clip_config.json, {WEIGHT_FILES[1]} and the tokenizer files from "
        f"https://huggingface.co/{repo_id} into a folder and set MODEL.BACKBONE.NAME to that folder "
        f"(or fill the Hugging Face cache, HF_HOME, on a machine with internet)"
    )


def _local_config(path):
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    return cfg.get("model_cfg", cfg), cfg.get("preprocess_cfg", {})


def _absolutize_hf_text(model_cfg, base_dir):
    """Point a relative hf_model_name/hf_tokenizer_name at ``base_dir`` (configs kept in the repo)."""
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text_cfg.get(key)
        if value and not os.path.isabs(value) and os.path.isdir(os.path.join(base_dir, value)):
            text_cfg[key] = os.path.join(base_dir, value)
    return text_cfg


def _build_from_config(display, config_file, weights, cache_dir, device):
    import open_clip

    model_cfg, preprocess_cfg = _local_config(config_file)
    arch = os.path.splitext(os.path.basename(config_file))[0]
    open_clip.add_model_config(config_file)
    text_cfg = _absolutize_hf_text(model_cfg, os.path.dirname(config_file))
    kwargs = {}
    if "hf_model_name" in text_cfg:
        # Test-sized towers are random-initialized from the config in the repo.
        text_cfg["hf_model_pretrained"] = False
        kwargs["text_cfg"] = text_cfg
    # Random initialization is what a test-sized config asks for: silence open_clip's warning about
    # it, and seed it so that every run (training, then --eval-only) gets the same backbone.
    logging.disable(logging.WARNING)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(
                arch, pretrained=weights or None, device=device, cache_dir=cache_dir,
                force_preprocess_cfg=preprocess_cfg or None, pretrained_text=False, **kwargs,
            )
    finally:
        logging.disable(logging.NOTSET)
    return model, _tokenizer_for(arch, text_cfg)


def _tokenizer_for(name, text_cfg):
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    if text_cfg.get("hf_tokenizer_name") and os.path.isdir(text_cfg["hf_tokenizer_name"]):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77),
                           **(text_cfg.get("tokenizer_kwargs") or {}))
    return open_clip.get_tokenizer(name)


def resolve_spec(name, pretrained=""):
    """What to build for a backbone name: a dict with one of config/hub/local/arch."""
    alias = ALIASES.get(name.lower())
    if alias:
        spec = dict(alias)
        if "config" in spec:
            spec["config"] = os.path.join(BACKBONE_CONFIG_DIR, spec["config"])
            weights = spec.get("weights")
            spec["weights"] = pretrained or (os.path.join(BACKBONE_CONFIG_DIR, weights) if weights else "")
        elif pretrained:
            spec["pretrained"] = pretrained
        return spec
    if name.startswith("hf-hub:"):
        return {"hub": name}
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "open_clip_config.json")):
            raise UserError(
                f"backbone folder {expanded} has no open_clip_config.json; copy the whole model snapshot "
                f"(open_clip_config.json and weights) there"
            )
        return {"local": os.path.abspath(expanded)}
    if os.sep in name or name.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise UserError(
            f"backbone path {name} not found; give a folder with open_clip_config.json and weights, or an "
            f"open_clip architecture as MODEL.BACKBONE.NAME with the weights file as MODEL.BACKBONE.PRETRAINED"
        )
    import open_clip

    arch = name.replace("/", "-")
    if arch not in open_clip.list_models():
        raise UserError(
            f"unknown backbone '{name}'; use an alias ({', '.join(sorted(ALIASES))}), an open_clip model name "
            f"(open_clip.list_models()), hf-hub:<repo id>, or a local model folder"
        )
    return {"arch": arch, "pretrained": pretrained}


def check_backbone(name, pretrained="", cache_dir=""):
    """Resolve a backbone and check, within seconds and without building it, that its weights can be had.

    Raises UserError naming the files needed and where to put them; returns the build spec.
    """
    import open_clip

    cache_dir = cache_dir or None
    spec = resolve_spec(name, pretrained)
    if "config" in spec:
        if spec["weights"] and not os.path.isfile(spec["weights"]):
            raise UserError(f"weights file for backbone '{name}' not found: {spec['weights']}")
    elif "hub" in spec:
        _require_hub_files(name, spec["hub"][len("hf-hub:"):], cache_dir)
    elif "local" in spec:
        from open_clip.factory import _find_checkpoint_in_dir

        # The same search open_clip's local-dir loading does: what it would not find would load as random weights.
        if _find_checkpoint_in_dir(Path(spec["local"])) is None:
            raise UserError(
                f"backbone folder {spec['local']} has no weights file (.safetensors, .bin or .pth); copy the model's "
                f"weights (e.g. {WEIGHT_FILES[1]}) next to its open_clip_config.json"
            )
    elif "arch" in spec:
        tag = spec.get("pretrained")
        if not tag:
            raise UserError(
                f"backbone '{name}' needs weights: set MODEL.BACKBONE.PRETRAINED to an open_clip tag "
                f"({', '.join(open_clip.list_pretrained_tags_by_model(spec['arch'])) or 'none known'}) or a weights file"
            )
        if not os.path.isfile(tag):
            pcfg = open_clip.get_pretrained_cfg(spec["arch"], tag)
            if not pcfg:
                raise UserError(f"unknown pretrained tag '{tag}' for {spec['arch']}; give a known tag or a weights file")
            hub = (pcfg.get("hf_hub") or "").strip("/")
            if hub and not _hf_cached(hub, WEIGHT_FILES, cache_dir) and not _hub_reachable():
                raise UserError(
                    f"backbone '{name}': weights ({spec['arch']}, {tag}) are not on disk and the hub cannot be reached; "
                    f"download {pcfg.get('url') or 'https://huggingface.co/' + hub} and set MODEL.BACKBONE.NAME "
                    f"{spec['arch']} MODEL.BACKBONE.PRETRAINED <path to the file>"
                )
    return spec


# Backbones kept in memory by keep_loaded_backbones(): (name, pretrained, cache_dir, device) -> Backbone.
# None (the default) keeps nothing, so a single run holds one copy of its model.
_loaded = None


@contextmanager
def keep_loaded_backbones(max_models=2):
    """Within the block, load_backbone builds each backbone once and hands out fresh copies.

    For processes that run many runs (sweeps): building a model (reading weights, initializing
    modules) is paid once. Each caller gets its own deep copy, since trainers move the model to
    their device and precision in place. At most ``max_models`` are kept, least recently used first out.
    """
    global _loaded
    outer, _loaded = _loaded, (_loaded if _loaded is not None else OrderedDict())
    _loaded.max_models = max_models if outer is None else max(max_models, outer.max_models)
    try:
        yield
    finally:
        if outer is None:
            _loaded = None


def load_backbone(name, pretrained="", cache_dir="", device="cpu"):
    """Build a backbone in eval mode with every parameter frozen (a fresh copy under keep_loaded_backbones)."""
    if _loaded is None:
        return _build_backbone(name, pretrained, cache_dir, device)
    key = (name, pretrained or "", cache_dir or "", str(device))
    if key in _loaded:
        _loaded.move_to_end(key)
        logger.info(f"backbone {name}: already loaded in this process")
    else:
        _loaded[key] = _build_backbone(name, pretrained, cache_dir, device)
        while len(_loaded) > _loaded.max_models:
            _loaded.popitem(last=False)
    kept = _loaded[key]
    return dataclasses.replace(kept, model=copy.deepcopy(kept.model))


def _build_backbone(name, pretrained, cache_dir, device):
    import open_clip

    spec = check_backbone(name, pretrained, cache_dir)
    cache_dir = cache_dir or None
    try:
        if "config" in spec:
            model, tokenizer = _build_from_config(name, spec["config"], spec["weights"], cache_dir, device)
        elif "hub" in spec:
            model = open_clip.create_model(spec["hub"], device=device, cache_dir=cache_dir)
            tokenizer = open_clip.get_tokenizer(spec["hub"], cache_dir=cache_dir)
        elif "local" in spec:
            model_cfg, _ = _local_config(os.path.join(spec["local"], "open_clip_config.json"))
            kwargs = {}
            text_cfg = copy.deepcopy(model_cfg.get("text_cfg", {}))
            if text_cfg.get("hf_model_name") and os.path.isfile(os.path.join(spec["local"], "config.json")):
                # The text encoder's own config sits in the folder: no hub look-up; its weights come
                # with the CLIP checkpoint, not from a separate text-model file.
                text_cfg["hf_model_name"] = spec["local"]
                text_cfg["hf_model_pretrained"] = False
                kwargs["text_cfg"] = text_cfg
            model = open_clip.create_model("local-dir:" + spec["local"], device=device, **kwargs)
            tokenizer = open_clip.get_tokenizer("local-dir:" + spec["local"])
        else:
            model = open_clip.create_model(spec["arch"], pretrained=spec["pretrained"], device=device, cache_dir=cache_dir)
            tokenizer = open_clip.get_tokenizer(spec["arch"])
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not build backbone '{name}': {first}") from None

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    text_kind = "hf" if _is_hf_text(model) else "native"
    context_length = getattr(tokenizer, "context_length", None) or 77
    logger.info(f"backbone {name}: {type(model).__name__}, text tower {text_kind}, image size {size}")
    return Backbone(
        name=name, model=model, tokenizer=tokenizer, text_kind=text_kind, image_size=size,
        mean=tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073))),
        std=tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711))),
        interpolation=pp.get("interpolation", "bicubic"), context_length=int(context_length),
    )


def _is_hf_text(model):
    from open_clip.hf_model import HFTextEncoder

    return isinstance(getattr(model, "text", None), HFTextEncoder)
