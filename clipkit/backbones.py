"""Backbone factory: every CLIP model is built by ``open_clip.create_model``.

``MODEL.BACKBONE.NAME`` may be
  - an alias below (``biomedclip``, ``pmc-clip``, ``ViT-B/16``, ``tiny-clip``, ...),
  - an open_clip architecture name with ``MODEL.BACKBONE.PRETRAINED`` a tag or weights file,
  - ``hf-hub:<repo id>``,
  - a local folder holding ``open_clip_config.json`` and the weights (a hub snapshot),
  - an OpenAI-format weights file (TorchScript or state dict), or a folder holding one:
    the architecture is read from the tensor shapes (``weight_files.py``).
The tiny test backbones are open_clip model configs kept in ``configs/backbones``,
built through the same call with random weights.
"""
from __future__ import annotations

import copy
import glob
import dataclasses
import json
import logging
import os
import socket
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from dataclasses import dataclass, field
from urllib.parse import urlparse

import torch

from core.errors import UserError
from core.utils import logger

from .weight_files import (WEIGHT_SUFFIXES, infer_model_cfg, is_torchscript, load_into, read_state_dict, sha256_of,
                           shape_differences)

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKBONE_CONFIG_DIR = os.path.join(PROJECT_DIR, "configs", "backbones")

# alias -> how to build it. "config": a JSON under configs/backbones (random init
# unless "weights" names a file next to it); "hub": an hf-hub id; "arch"+"pretrained":
# an open_clip architecture and pretrained tag. "file_arch": the open_clip architecture of
# the hub model, used when MODEL.BACKBONE.PRETRAINED gives its weights as a file instead.
ALIASES = {
    "tiny-clip": {"config": "tiny-clip.json"},
    "tiny-bert-clip": {"config": "tiny-bert-clip.json"},
    # BiomedCLIP's shape (timm ViT image tower, BERT text tower) at test size.
    "tiny-timm-clip": {"config": "tiny-timm-clip.json"},
    "demo-clip": {"config": "demo-clip.json", "weights": "demo-clip/demo-clip.safetensors"},
    # The hub's open_clip_config.json is open_clip's ViT-L-14 (GELU, as it was fine-tuned with open_clip);
    # the same architecture takes pmc_vit_l_14_weights.pt, the file the original instructions name.
    "pmc-clip": {"hub": "hf-hub:ryanyip7777/pmc_vit_l_14", "file_arch": "ViT-L-14"},
    # PMC-CLIP as the original code builds it (its clip.model.build_model): the same weights in
    # OpenAI's CLIP with QuickGELU, every weight rounded to fp16 (see round_weights_to_half).
    "pmc-clip-original": {"hub": "hf-hub:ryanyip7777/pmc_vit_l_14", "file_arch": "ViT-L-14-quickgelu",
                          "original_build": True},
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
    # What the features depend on: name, weights (file, tag or hub id), their sha256 and
    # format, and the open_clip model config. JSON-serializable; recorded in results.json.
    identity: dict = field(default_factory=dict)


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
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _require_hub_files(display, repo_id, cache_dir, file_option=""):
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
        f"(or fill the Hugging Face cache, HF_HOME, on a machine with internet){file_option}"
    )


def _local_config(path):
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    return cfg.get("model_cfg", cfg), cfg.get("preprocess_cfg", {})


# text_cfg.tokenizer_kwargs a model config may set: how text is cleaned and split, nothing that loads code
# (trust_remote_code, a tokenizer class or file of the model's own).
TOKENIZER_KWARGS = ("clean", "strip_sep_token", "language", "do_lower_case", "use_fast")


def _check_text_cfg(text_cfg, source):
    """Refuse tokenizer settings that could load code from a model folder; UserError in one line."""
    kwargs = text_cfg.get("tokenizer_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise UserError(f"{source}: text_cfg.tokenizer_kwargs must be a mapping, not {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key == "trust_remote_code":
            raise UserError(
                f"{source}: text_cfg.tokenizer_kwargs sets trust_remote_code, which would run Python code from the "
                f"model's files; code from a model folder is never run: remove it from the config"
            )
        if key not in TOKENIZER_KWARGS or not isinstance(value, (str, bool, int, type(None))):
            raise UserError(
                f"{source}: unknown text_cfg.tokenizer_kwargs entry '{key}' ({value!r}); allowed: "
                f"{', '.join(TOKENIZER_KWARGS)} with plain values: remove it from the config"
            )


def _check_hf_folder(folder, source):
    """A Hugging Face text tower read from ``folder`` may only be a built-in architecture, never the folder's code."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{source}: cannot read {path} ({type(e).__name__}); is the model folder complete?") from None
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type") if isinstance(config, dict) else None
    # With a built-in model_type, transformers uses its own code and ignores an auto_map; without one it would
    # ask to run the folder's code.
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise UserError(
            f"{source}: {path} names no built-in Hugging Face architecture (model_type {model_type!r}); a text "
            f"tower is never built from code in the model folder: use a folder of a built-in architecture (e.g. bert)"
        )


@contextmanager
def _remote_code_refused():
    """Within: Hugging Face loaders refuse code of a model's own where they would ask whether to run it."""
    from transformers import dynamic_module_utils

    saved = dynamic_module_utils.TIME_OUT_REMOTE_CODE
    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0  # no prompt: trust_remote_code stays off
    try:
        yield
    finally:
        dynamic_module_utils.TIME_OUT_REMOTE_CODE = saved


def _get_tokenizer(name, text_cfg, source, **kwargs):
    """open_clip.get_tokenizer with the config's tokenizer settings checked and remote code off for HF tokenizers."""
    import open_clip

    _check_text_cfg(text_cfg, source)
    if text_cfg.get("hf_tokenizer_name"):
        kwargs["trust_remote_code"] = False
    return open_clip.get_tokenizer(name, **kwargs)


def _absolutize_hf_text(model_cfg, base_dir):
    """Point a relative hf_model_name/hf_tokenizer_name at ``base_dir`` (configs kept in the repo)."""
    text_cfg = dict(model_cfg.get("text_cfg", {}))
    for key in ("hf_model_name", "hf_tokenizer_name"):
        value = text_cfg.get(key)
        if value and not os.path.isabs(value) and os.path.isdir(os.path.join(base_dir, value)):
            text_cfg[key] = os.path.join(base_dir, value)
    return text_cfg


def _quiet_create(*args, **kwargs):
    """open_clip.create_model without its warning that no weights were loaded (they are loaded after)."""
    import open_clip

    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(*args, **kwargs)
    finally:
        logging.disable(logging.NOTSET)


def round_weights_to_half(model):
    """Round weights through fp16 where the original code's clip.model.convert_weights halves them:
    convolution and linear weights and biases, attention input projections and biases, and the text and
    image projections; layer norms, embeddings and the logit scale keep fp32. The model stays fp32."""
    def rounded(t):
        t.data = t.data.half().float()

    for module in model.modules():
        if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            for t in (module.weight, module.bias):
                if t is not None:
                    rounded(t)
        if isinstance(module, torch.nn.MultiheadAttention):
            for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                         "bias_k", "bias_v"):
                if getattr(module, name, None) is not None:
                    rounded(getattr(module, name))
        for name in ("text_projection", "proj"):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor):
                rounded(t)


def _build_from_config(display, config_file, weights, cache_dir, device, **create):
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
    # Random initialization is what a test-sized config asks for; seed it so that every run
    # (training, then --eval-only) gets the same backbone.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _quiet_create(arch, device=device, cache_dir=cache_dir, force_preprocess_cfg=preprocess_cfg or None,
                              pretrained_text=False, **kwargs, **create)
    if weights:
        _load_weights_file(model, weights, f"backbone '{display}'")
    return model, _tokenizer_for(arch, text_cfg)


def _load_weights_file(model, path, display, read=None):
    """Load a weights file (any accepted format; ``read``: its read_state_dict result) into a model; identity facts."""
    state_dict, kind = read or read_state_dict(path)
    load_into(model, state_dict, f"{display} ({path})")
    return {"weights": os.path.abspath(path), "weights_sha256": sha256_of(path), "weights_format": kind}


def _build_openai_format(display, path, arch, device):
    """A CLIP from an OpenAI-format weights file: architecture from ``arch`` or read from the tensor shapes."""
    import open_clip
    from open_clip.model import CLIP, set_model_preprocess_cfg
    from open_clip.tokenizer import SimpleTokenizer

    state_dict, kind = read_state_dict(path)
    model_cfg = infer_model_cfg(state_dict, f"weights file {path}")
    if arch:
        expected = open_clip.get_model_config(arch)
        differences = shape_differences(model_cfg, expected)
        if differences:
            raise UserError(
                f"weights file {path} is not {display}'s architecture ({arch}): {'; '.join(differences[:3])}; "
                f"give it as MODEL.BACKBONE.NAME alone to build the architecture its shapes describe"
            )
        model = _quiet_create(arch, device=device)
        model_cfg = expected
    else:
        tokenizer = SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
        if model_cfg["text_cfg"]["vocab_size"] != tokenizer.vocab_size:
            raise UserError(
                f"weights file {path}: a text vocabulary of {model_cfg['text_cfg']['vocab_size']} tokens is not CLIP's "
                f"BPE ({tokenizer.vocab_size}); give an open_clip model folder with its tokenizer instead"
            )
        model = CLIP(**model_cfg).to(device)
        set_model_preprocess_cfg(model, {"size": model_cfg["vision_cfg"]["image_size"], "mean": OPENAI_MEAN,
                                         "std": OPENAI_STD, "interpolation": "bicubic", "resize_mode": "shortest"})
    load_into(model, state_dict, f"weights file {path}")
    if arch:
        tokenizer = open_clip.get_tokenizer(arch)
    identity = {"weights": os.path.abspath(path), "weights_sha256": sha256_of(path), "weights_format": kind,
                "architecture": model_cfg}
    return model, tokenizer, identity


def _tokenizer_for(name, text_cfg):
    import open_clip
    from open_clip.tokenizer import HFTokenizer

    _check_text_cfg(text_cfg, f"backbone config {name}")
    if text_cfg.get("hf_tokenizer_name") and os.path.isdir(text_cfg["hf_tokenizer_name"]):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=text_cfg.get("context_length", 77),
                           trust_remote_code=False, **(text_cfg.get("tokenizer_kwargs") or {}))
    return open_clip.get_tokenizer(name)


def _weight_files_in(folder):
    return sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.endswith(WEIGHT_SUFFIXES) and os.path.isfile(p))


def _folder_spec(folder):
    """A model folder: a hub snapshot (open_clip_config.json and weights), or one OpenAI-format weights file."""
    from open_clip.factory import _find_checkpoint_in_dir

    files = _weight_files_in(folder)
    if os.path.isfile(os.path.join(folder, "open_clip_config.json")):
        spec = {"local": folder}
        # open_clip's own folder search does not look at .pt files; the pmc_vit_l_14_weights.pt kind of file
        # next to a hub config is used when there is nothing else.
        found = _find_checkpoint_in_dir(Path(folder))
        if found is not None and is_torchscript(found):
            spec["weights_file"] = found  # read here as data: open_clip's loader would refuse it or run its code
        elif found is None:
            pt_files = [f for f in files if f.endswith(".pt")]
            if len(pt_files) > 1:
                raise UserError(f"backbone folder {folder} holds several .pt files ({', '.join(map(os.path.basename, pt_files))}); keep one")
            if pt_files:
                spec["weights_file"] = pt_files[0]
        return spec
    if len(files) == 1:
        return {"file": files[0], "arch": ""}
    if len(files) > 1:
        raise UserError(
            f"backbone folder {folder} has no open_clip_config.json and several weights files "
            f"({', '.join(map(os.path.basename, files[:4]))}); keep one, or give the file itself as MODEL.BACKBONE.NAME"
        )
    raise UserError(
        f"backbone folder {folder} has no open_clip_config.json and no weights file; copy the whole model snapshot "
        f"(open_clip_config.json and weights) there, or an OpenAI-format weights file (.pt)"
    )


def resolve_spec(name, pretrained=""):
    """What to build for a backbone name: a dict with one of config/hub/local/arch/file."""
    pretrained = os.path.expanduser(pretrained) if pretrained else ""
    alias = ALIASES.get(name.lower())
    if alias:
        spec = dict(alias)
        if "config" in spec:
            spec["config"] = os.path.join(BACKBONE_CONFIG_DIR, spec["config"])
            weights = spec.get("weights")
            spec["weights"] = pretrained or (os.path.join(BACKBONE_CONFIG_DIR, weights) if weights else "")
        elif "hub" in spec:
            file_arch = spec.pop("file_arch", None)
            if pretrained:
                if not file_arch:
                    raise UserError(
                        f"backbone '{name}' takes no MODEL.BACKBONE.PRETRAINED; to use a local copy, give the folder "
                        f"with its hub files as MODEL.BACKBONE.NAME"
                    )
                if not os.path.isfile(pretrained):
                    raise UserError(f"MODEL.BACKBONE.PRETRAINED {pretrained} not found; give the path of the weights file")
                return {"file": os.path.abspath(pretrained), "arch": file_arch,
                        "original_build": spec.get("original_build", False)}
        elif pretrained:
            spec["pretrained"] = pretrained
        return spec
    if name.startswith("hf-hub:"):
        return {"hub": name}
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return _folder_spec(os.path.abspath(expanded))
    if os.path.isfile(expanded):
        return {"file": os.path.abspath(expanded), "arch": ""}
    if os.sep in name or name.endswith(WEIGHT_SUFFIXES):
        raise UserError(
            f"backbone path {name} not found; give an OpenAI-format weights file (.pt), a folder with "
            f"open_clip_config.json and weights, or an open_clip architecture as MODEL.BACKBONE.NAME with the weights "
            f"file as MODEL.BACKBONE.PRETRAINED"
        )
    import open_clip

    arch = name.replace("/", "-")
    if arch not in open_clip.list_models():
        raise UserError(
            f"unknown backbone '{name}'; use an alias ({', '.join(sorted(ALIASES))}), an open_clip model name "
            f"(open_clip.list_models()), hf-hub:<repo id>, a local model folder, or an OpenAI-format weights file"
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
        # Aliases that also take a weights file (pmc-clip: the original pmc_vit_l_14_weights.pt) say so.
        file_option = ("; or give the weights file you have: MODEL.BACKBONE.PRETRAINED /path/to/weights.pt "
                       "(for pmc-clip, the original pmc_vit_l_14_weights.pt)"
                       if ALIASES.get(name.lower(), {}).get("file_arch") else "")
        _require_hub_files(name, spec["hub"][len("hf-hub:"):], cache_dir, file_option)
    elif "local" in spec:
        from open_clip.factory import _find_checkpoint_in_dir

        # The same search open_clip's local-dir loading does: what it would not find would load as random weights.
        if _find_checkpoint_in_dir(Path(spec["local"])) is None and not spec.get("weights_file"):
            raise UserError(
                f"backbone folder {spec['local']} has no weights file (.safetensors, .bin, .pth or .pt); copy the "
                f"model's weights (e.g. {WEIGHT_FILES[1]}) next to its open_clip_config.json"
            )
    elif "arch" in spec and "file" not in spec:
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


def _hub_identity(repo_id, cache_dir):
    """Weights facts of a cached hub model: the Hugging Face cache names LFS blobs by their sha256."""
    path = _hf_cached(repo_id, WEIGHT_FILES, cache_dir)
    config = _hf_cached(repo_id, ["open_clip_config.json"], cache_dir)
    identity = {"weights": f"hf-hub:{repo_id}", "weights_sha256": None, "weights_format": None,
                "architecture": _local_config(config)[0] if config else None}
    if path:
        blob = os.path.basename(os.path.realpath(path))
        identity["weights_sha256"] = blob if len(blob) == 64 else sha256_of(path)
        identity["weights_format"] = "safetensors" if path.endswith(".safetensors") else "state_dict"
    return identity


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


@_remote_code_refused()
def _build_backbone(name, pretrained, cache_dir, device):
    import open_clip

    spec = check_backbone(name, pretrained, cache_dir)
    cache_dir = cache_dir or None
    # The original code's build: QuickGELU (the weights-file path has it in its architecture name).
    create = {"force_quick_gelu": True} if spec.get("original_build") else {}
    try:
        if "config" in spec:
            model, tokenizer = _build_from_config(name, spec["config"], None, cache_dir, device, **create)
            identity = {"architecture": _local_config(spec["config"])[0]}
            if spec["weights"]:
                identity.update(_load_weights_file(model, spec["weights"], f"backbone '{name}'"))
        elif "file" in spec:
            model, tokenizer, identity = _build_openai_format(name, spec["file"], spec["arch"], device)
        elif "hub" in spec:
            model = open_clip.create_model(spec["hub"], device=device, cache_dir=cache_dir, **create)
            hub_config = _hf_cached(spec["hub"][len("hf-hub:"):], ["open_clip_config.json"], cache_dir)
            hub_text_cfg = _local_config(hub_config)[0].get("text_cfg", {}) if hub_config else {}
            tokenizer = _get_tokenizer(spec["hub"], hub_text_cfg, f"backbone '{name}'", cache_dir=cache_dir)
            identity = _hub_identity(spec["hub"][len("hf-hub:"):], cache_dir)
        elif "local" in spec:
            config_file = os.path.join(spec["local"], "open_clip_config.json")
            model_cfg, _ = _local_config(config_file)
            kwargs = {}
            text_cfg = copy.deepcopy(model_cfg.get("text_cfg", {}))
            source = f"backbone folder {spec['local']}"
            _check_text_cfg(text_cfg, source)
            hf_name = text_cfg.get("hf_model_name")
            if isinstance(hf_name, str) and os.path.isfile(os.path.join(hf_name, "config.json")):
                _check_hf_folder(hf_name, source)  # a text tower in another folder
            if text_cfg.get("hf_model_name") and os.path.isfile(os.path.join(spec["local"], "config.json")):
                _check_hf_folder(spec["local"], source)
                # The text encoder's own config sits in the folder: no hub look-up; its weights come
                # with the CLIP checkpoint, not from a separate text-model file.
                text_cfg["hf_model_name"] = spec["local"]
                text_cfg["hf_model_pretrained"] = False
                kwargs["text_cfg"] = text_cfg
            if spec.get("weights_file"):
                read = read_state_dict(spec["weights_file"])  # an unreadable file fails before the build
                model = _quiet_create("local-dir:" + spec["local"], device=device, load_weights=False, **kwargs)
                identity = _load_weights_file(model, spec["weights_file"], f"backbone '{name}'", read)
            else:
                from open_clip.factory import _find_checkpoint_in_dir

                model = open_clip.create_model("local-dir:" + spec["local"], device=device, **kwargs)
                found = _find_checkpoint_in_dir(Path(spec["local"]))
                identity = {"weights": os.path.abspath(found), "weights_sha256": sha256_of(found),
                            "weights_format": "safetensors" if found.endswith(".safetensors") else "state_dict"}
            identity["architecture"] = model_cfg
            tokenizer = _get_tokenizer("local-dir:" + spec["local"], text_cfg, source)
        else:
            tag = spec["pretrained"]
            if os.path.isfile(tag):
                # Through the same reader as other files: TorchScript archives included.
                read = read_state_dict(tag)
                model = _quiet_create(spec["arch"], device=device, cache_dir=cache_dir)
                identity = _load_weights_file(model, tag, f"backbone '{name}'", read)
            else:
                model = open_clip.create_model(spec["arch"], pretrained=tag, device=device, cache_dir=cache_dir)
                identity = {"weights": tag, "weights_sha256": None, "weights_format": None}
            identity["architecture"] = open_clip.get_model_config(spec["arch"])
            tokenizer = open_clip.get_tokenizer(spec["arch"])
    except UserError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not build backbone '{name}': {first}") from None

    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if spec.get("original_build"):
        round_weights_to_half(model)
        identity["build"] = "original code's: QuickGELU, weights rounded to fp16 as its clip.model.convert_weights"
        if isinstance(identity.get("architecture"), dict):
            identity["architecture"] = dict(identity["architecture"], quick_gelu=True)
    pp = getattr(model.visual, "preprocess_cfg", None) or {}
    size = pp.get("size", getattr(model.visual, "image_size", 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    text_kind = "hf" if _is_hf_text(model) else "native"
    context_length = getattr(tokenizer, "context_length", None) or 77
    identity = {"name": name, "weights": None, "weights_sha256": None, "weights_format": None, **identity}
    logger.info(f"backbone {name}: {type(model).__name__}, text tower {text_kind}, image size {size}"
                + (f", weights {identity['weights']} (sha256 {identity['weights_sha256'][:12]}...)"
                   if identity.get("weights_sha256") else ""))
    return Backbone(
        name=name, model=model, tokenizer=tokenizer, text_kind=text_kind, image_size=size,
        mean=tuple(pp.get("mean", OPENAI_MEAN)), std=tuple(pp.get("std", OPENAI_STD)),
        interpolation=pp.get("interpolation", "bicubic"), context_length=int(context_length), identity=identity,
    )


def _is_hf_text(model):
    from open_clip.hf_model import HFTextEncoder

    return isinstance(getattr(model, "text", None), HFTextEncoder)
