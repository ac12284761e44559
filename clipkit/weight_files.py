"""Reading CLIP weights files as users have them, without running pickled code.

A weights file may be a TorchScript archive (OpenAI's downloads), a ``torch.save``
of a state dict (``pmc_vit_l_14_weights.pt``), a training checkpoint holding one
under ``state_dict`` (open_clip's, UniMed-CLIP's), or safetensors. A TorchScript
archive is read as data (``_torchscript.py``): its pickled tensors are rebuilt and its
code never runs. Everything else is read with ``weights_only=True``.
An OpenAI-format state dict names its tensors like OpenAI's CLIP, so the
architecture can be read from their shapes (:func:`infer_model_cfg`).
"""
from __future__ import annotations

import hashlib
import os
import zipfile

import torch

from core.errors import UserError

from ._torchscript import Unreadable, read_torchscript_state_dict

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")

# Entries of OpenAI's TorchScript state dicts (and of scripted open_clip models) that are
# not weights: model facts kept as tensors, and the causal mask buffer.
NON_WEIGHT_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")

_SHA256 = {}


def sha256_of(path):
    """Hex sha256 of a file, computed once per (path, size, mtime) in a process."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA256:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _SHA256[key] = digest.hexdigest()
    return _SHA256[key]


def is_torchscript(path):
    """TorchScript archives are zip files holding code and constants; torch.save files hold data.pkl only."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def read_state_dict(path):
    """The tensors of a weights file as a plain dict; ``(state_dict, kind)``.

    kind is "torchscript", "state_dict" or "safetensors". Raises UserError with one
    line saying what is wrong with the file.
    """
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return dict(load_file(path, device="cpu")), "safetensors"
        if is_torchscript(path):
            try:
                return dict(read_torchscript_state_dict(path)), "torchscript"
            except Unreadable as e:
                raise UserError(
                    f"TorchScript file {path} is not read: {e}; code from a weights file is never run. If the file comes "
                    f"from a source you trust, convert it once in a trusted environment: "
                    f"torch.save(torch.jit.load(path).state_dict(), 'weights.pt'), and give that file"
                ) from None
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:  # unpickling refused (a pickled module), truncated file, not a torch file
        if "Unsupported global" in str(e):
            raise UserError(
                f"weights file {path} holds pickled Python objects, not only tensors; re-save it as a state dict "
                f"(torch.save(model.state_dict(), path)) or give the TorchScript or safetensors file"
            ) from None
        first = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        if "Weights only load failed" in first:  # torch's preamble; the cause is that it is no pickle of tensors
            first = "not a PyTorch, TorchScript or safetensors file"
        raise UserError(f"cannot read weights file {path} ({first}); is it complete and in one of those formats?") from None
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise UserError(f"weights file {path} holds no state dict (found {type(checkpoint).__name__})")
    not_tensors = [k for k, v in checkpoint.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise UserError(f"weights file {path} is not a state dict: entry '{not_tensors[0]}' is not a tensor")
    if all(k.startswith("module.") for k in checkpoint):  # saved from a DataParallel/DDP wrapper
        checkpoint = {k[len("module."):]: v for k, v in checkpoint.items()}
    return dict(checkpoint), "state_dict"


def _count(state_dict, prefix, index_at):
    """Number of distinct indices at dotted position ``index_at`` among keys starting with ``prefix``."""
    return len({k.split(".")[index_at] for k in state_dict if k.startswith(prefix)})


def infer_model_cfg(state_dict, source="weights file"):
    """open_clip model config (with ``quick_gelu`` as OpenAI's CLIP) read from an OpenAI-format state dict.

    Text heads follow OpenAI's rule of one head per 64 channels, as do vision heads.
    """
    required = ("text_projection", "positional_embedding", "token_embedding.weight", "ln_final.weight")
    missing = [k for k in required if k not in state_dict]
    if missing or not any(k.startswith("visual.") for k in state_dict):
        raise UserError(
            f"{source} is not an OpenAI-format CLIP state dict (no {', '.join(missing) or 'visual.*'}); give an "
            f"open_clip model folder (open_clip_config.json and weights) instead"
        )
    sd = state_dict
    if "visual.proj" in sd and "visual.conv1.weight" in sd:
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_cfg = {
            "image_size": patch * grid,
            "layers": _count(sd, "visual.transformer.resblocks.", 3),
            "width": sd["visual.conv1.weight"].shape[0],
            "patch_size": patch,
        }
    elif "visual.attnpool.positional_embedding" in sd:
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision_cfg = {
            "image_size": grid * 32,  # the modified ResNet downsamples 32 times
            "layers": [_count(sd, f"visual.layer{i}.", 2) for i in (1, 2, 3, 4)],
            "width": sd["visual.layer1.0.conv1.weight"].shape[0],
        }
    else:
        raise UserError(f"{source}: image tower not recognized (neither OpenAI's ViT nor its ResNet)")
    width = sd["ln_final.weight"].shape[0]
    text_cfg = {
        "context_length": sd["positional_embedding"].shape[0],
        "vocab_size": sd["token_embedding.weight"].shape[0],
        "width": width,
        "heads": max(width // 64, 1),
        "layers": _count(sd, "transformer.resblocks.", 2),
    }
    return {"embed_dim": sd["text_projection"].shape[1], "quick_gelu": True,
            "vision_cfg": vision_cfg, "text_cfg": text_cfg}


def shape_differences(model_cfg, expected_cfg):
    """'tower key found (expected ...)' for each shape fact in which two open_clip configs differ."""
    listed = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]
    differences = []
    for tower in ("vision_cfg", "text_cfg"):
        for key in ("image_size", "layers", "width", "patch_size", "context_length", "vocab_size"):
            a, b = model_cfg.get(tower, {}).get(key), expected_cfg.get(tower, {}).get(key)
            if a is not None and b is not None and listed(a) != listed(b):
                differences.append(f"{tower[:-4]} {key} {a} (expected {b})")
    if model_cfg.get("embed_dim") != expected_cfg.get("embed_dim"):
        differences.append(f"embed_dim {model_cfg.get('embed_dim')} (expected {expected_cfg.get('embed_dim')})")
    return differences


def load_into(model, state_dict, source):
    """Copy a state dict into an open_clip model; every weight must be there and fit. UserError otherwise."""
    from open_clip.factory import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    sd = {k: v for k, v in state_dict.items() if k not in NON_WEIGHT_KEYS}
    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    own = model.state_dict()
    if "logit_scale" in sd and sd["logit_scale"].shape != own["logit_scale"].shape:
        sd["logit_scale"] = sd["logit_scale"].reshape(own["logit_scale"].shape)
    if "logit_bias" in own and "logit_bias" not in sd:
        sd["logit_bias"] = torch.zeros_like(own["logit_bias"])
    sd.pop("text.transformer.embeddings.position_ids", None)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
            f"shape {', '.join(wrong[:2])}" if wrong else "",
        ) if part)
        raise UserError(f"weights of {source} do not fit the model ({detail}); is it the right file for this backbone?")
    model.load_state_dict(sd, strict=True)
