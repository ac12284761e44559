"""Prompts trained by the original research code: CoOp, CoCoOp, IVLP, MaPLe and MedPromptCLIP.

Their trainers save with Dassl: ``<run>/<model name>/model.pth.tar-<epoch>`` plus a
``checkpoint`` file naming the latest, each a ``torch.save`` of
``{state_dict, epoch, optimizer, scheduler, val_result}``. The model folders and the
learnable tensors in ``state_dict``:

- ``prompt_learner/``: CoOp, ``ctx`` (n_ctx, width) or (n_cls, n_ctx, width); CoCoOp adds
  ``meta_net.linear1/linear2.*``.
- ``MultiModalPromptLearner/``: MaPLe, ``prompt_learner.ctx``,
  ``prompt_learner.compound_prompts_text.<i>`` (text layer i + 1), ``prompt_learner.proj.*``
  (the layer-0 text -> vision map) and ``prompt_learner.compound_prompt_projections.<i>.*``
  (layer i + 1).
- ``VLPromptLearner/``: MedPromptCLIP and IVLP, ``prompt_learner.ctx`` and
  ``text_encoder.transformer.resblocks.<i>.VPT_shallow`` (placed before text layer i, i >= 1);
  IVLP adds ``image_encoder.VPT`` and ``image_encoder.transformer.resblocks.<i>.VPT_shallow``.

Besides those, the files hold buffers (``token_prefix``/``token_suffix``: embeddings of
the training class names) and, for MaPLe, IVLP and MedPromptCLIP, the whole frozen CLIP;
both are ignored (and counted). :func:`read_original_run` turns such a folder into this
project's tensor names; ``CLIPTrainer.load_model`` (``--model-dir``) and
``ImagePromptTrainer.init_text_prompts`` (``--init-from``) call it first.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from core.checkpoint import read_pointer, refuse_torchscript
from core.errors import UserError
from core.utils import logger

# Dassl model folder -> the methods that write it.
ORIGINAL_FOLDERS = {
    "VLPromptLearner": "MedPromptCLIP or IVLP",
    "MultiModalPromptLearner": "MaPLe",
    "prompt_learner": "CoOp or CoCoOp",
}

# Original tensor name -> this project's name. "text." marks the text PromptLearner's tensors
# ("ctx", "deep_ctx.<i>"), wherever the trainer keeps that learner.
_LEARNABLE = [
    (re.compile(r"(?:prompt_learner\.)?ctx"), lambda m: "text.ctx"),
    (re.compile(r"prompt_learner\.compound_prompts_text\.(\d+)"), lambda m: f"text.deep_ctx.{m[1]}"),
    (re.compile(r"text_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow"),
     lambda m: f"text.deep_ctx.{int(m[1]) - 1}"),
    (re.compile(r"prompt_learner\.proj\.(weight|bias)"), lambda m: f"couplers.0.{m[1]}"),
    (re.compile(r"prompt_learner\.compound_prompt_projections\.(\d+)\.(weight|bias)"),
     lambda m: f"couplers.{int(m[1]) + 1}.{m[2]}"),
    (re.compile(r"image_encoder\.VPT"), lambda m: "vision.0"),
    (re.compile(r"image_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow"), lambda m: f"vision.{m[1]}"),
    (re.compile(r"(?:prompt_learner\.)?meta_net\.linear1\.(weight|bias)"), lambda m: f"meta_net.0.{m[1]}"),
    (re.compile(r"(?:prompt_learner\.)?meta_net\.linear2\.(weight|bias)"), lambda m: f"meta_net.2.{m[1]}"),
]
# Embeddings of the class names the prompts were trained with: rebuilt for the classes evaluated.
_BUFFERS = re.compile(r"(?:prompt_learner\.)?token_(?:prefix|suffix)")
# The frozen CLIP (MaPLe, IVLP: text and image encoders; MedPromptCLIP: also a zero-shot copy).
_FROZEN = re.compile(
    r"logit_scale|prompt_learner\.clip_model_zs\..+|image_encoder\..+"
    r"|text_encoder\.(?:transformer\.resblocks\.\d+\..+|positional_embedding|ln_final\..+|text_projection)"
)


@dataclass
class OriginalRun:
    """Learnable tensors of an original run under this project's names."""

    path: str  # the checkpoint file
    folder: str  # its Dassl model folder name
    method: str  # which original trainer wrote it
    state_dict: dict  # {"text.ctx": ..., "text.deep_ctx.0": ..., "couplers.0.weight": ..., ...}
    sources: dict  # this project's name -> original name
    ignored: dict = field(default_factory=dict)  # {"buffers": [...], "frozen CLIP tensors": n}
    frozen: dict = field(default_factory=dict)  # frozen CLIP tensors under the backbone's own names

    def record(self):
        """What results.json says about the loaded checkpoint."""
        return {"checkpoint": self.path, "method": self.method, "loaded": dict(self.sources), "ignored": self.ignored}


# --------------------------------------------------------------------------- reading


class _Discarded:
    """Stands in for the optimizer and scheduler objects pickled inside a Dassl checkpoint: nothing runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def _plain_dict(*args):
    return {}


def read_dassl_checkpoint(path):
    """A Dassl checkpoint dict, read with ``weights_only=True``.

    Dassl's warmup schedulers keep their successor scheduler object (and through it the
    optimizer) in their state dict, so a plain ``weights_only`` load refuses many original
    checkpoints. Those objects, and only classes of ``torch.optim`` / ``dassl``, are read
    as inert stand-ins; the tensors of ``state_dict`` are all that is used.
    """
    refuse_torchscript(path)
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # not a zip checkpoint (legacy format): the plain load below says what it can
        needed = []
    stand_ins = []
    for name in needed:
        if name.startswith(("torch.optim.", "dassl.")) or name == "builtins.dict":
            stand_ins.append((type(name.rsplit(".", 1)[-1], (_Discarded,), {}), name))
        elif name == "collections.defaultdict":  # the optimizer's per-parameter state
            stand_ins.append((_plain_dict, name))
        else:
            raise UserError(
                f"checkpoint {path} holds a pickled {name}, which no Dassl checkpoint contains; it is not read "
                f"(weights_only=True). Give the output folder of an original CoOp, MaPLe, IVLP or MedPromptCLIP run"
            )
    try:
        with torch.serialization.safe_globals(stand_ins):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0][:100] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read checkpoint {path} ({first}); it may be incomplete") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise UserError(f"checkpoint {path} has no state_dict of tensors; it is not a Dassl checkpoint")
    return checkpoint


def _pick_file(model_dir, epoch):
    """The checkpoint file of a Dassl model folder: the given epoch, else the one its pointer names, else the last."""
    if epoch is not None:
        path = os.path.join(model_dir, f"model.pth.tar-{epoch}")
        if not os.path.isfile(path):
            raise UserError(f"no checkpoint of epoch {epoch} in {model_dir} (expected {path})")
        return path
    named = read_pointer(model_dir)  # only a file of the folder itself
    if named and os.path.isfile(named):
        return named
    epochs = sorted(int(m[1]) for m in (re.fullmatch(r"model\.pth\.tar-(\d+)", n) for n in os.listdir(model_dir)) if m)
    if epochs:
        return os.path.join(model_dir, f"model.pth.tar-{epochs[-1]}")
    if os.path.isfile(os.path.join(model_dir, "model-best.pth.tar")):
        return os.path.join(model_dir, "model-best.pth.tar")
    raise UserError(f"{model_dir} holds no checkpoint (model.pth.tar-<epoch> or model-best.pth.tar)")


def find_original_checkpoint(run_dir, epoch=None):
    """(folder name, checkpoint path, checkpoint) of an original run folder, or None if it is not one.

    ``prompt_learner/`` is also this project's folder name: an original one is told apart by
    the class-name buffers that original CoOp and CoCoOp always save.
    """
    for folder in ORIGINAL_FOLDERS:
        model_dir = os.path.join(run_dir, folder)
        if not os.path.isdir(model_dir):
            continue
        if folder == "prompt_learner":
            try:
                path = _pick_file(model_dir, epoch)
                checkpoint = read_dassl_checkpoint(path)
            except UserError:
                return None  # not an original checkpoint: this project's own loader says what is wrong
            if not any(_BUFFERS.fullmatch(k) for k in checkpoint["state_dict"]):
                return None  # this project's own checkpoint
            return folder, path, checkpoint
        path = _pick_file(model_dir, epoch)
        return folder, path, read_dassl_checkpoint(path)
    return None


# --------------------------------------------------------------------------- mapping


def _backbone_name(original):
    """The frozen backbone's own name for an original frozen-CLIP tensor name, or None."""
    for prefix, replacement in (("prompt_learner.clip_model_zs.", ""), ("text_encoder.", ""),
                                ("image_encoder.", "visual.")):
        if original.startswith(prefix):
            return replacement + original[len(prefix):]
    return original if original == "logit_scale" else None


def convert_original(folder, path, state_dict):
    """Map an original state dict to an :class:`OriginalRun`; an unknown tensor is a UserError."""
    converted, sources, buffers, frozen = {}, {}, [], {}
    for name, tensor in state_dict.items():
        for pattern, rename in _LEARNABLE:
            match = pattern.fullmatch(name)
            if match:
                ours = rename(match)
                if ours in converted or ours.endswith(".-1"):
                    raise UserError(f"checkpoint {path}: {name} has no place in this project's prompts (maps to {ours})")
                converted[ours] = tensor
                sources[ours] = name
                break
        else:
            if _BUFFERS.fullmatch(name):
                buffers.append(name)
            elif _FROZEN.fullmatch(name):
                frozen[_backbone_name(name)] = tensor
            else:
                raise UserError(
                    f"checkpoint {path} holds '{name}', which is neither a prompt of the original CoOp, CoCoOp, IVLP, "
                    f"MaPLe or MedPromptCLIP trainers nor a frozen CLIP weight; it cannot be mapped"
                )
    if "text.ctx" not in converted:
        raise UserError(f"checkpoint {path} holds no prompt context (ctx); it is not a prompt learner's checkpoint")
    if folder == "VLPromptLearner":
        method = "IVLP" if any(k.startswith("vision.") for k in converted) else "MedPromptCLIP"
    elif folder == "MultiModalPromptLearner":
        method = "MaPLe"
    else:
        method = "CoCoOp" if any(k.startswith("meta_net.") for k in converted) else "CoOp"
    ignored = {"buffers": buffers, "frozen CLIP tensors": len(frozen)}
    return OriginalRun(path, folder, method, converted, sources, ignored, frozen)


def read_original_run(run_dir, epoch=None):
    """An :class:`OriginalRun` for a folder written by the original code, or None for any other folder."""
    if not run_dir or not os.path.isdir(run_dir):
        return None
    found = find_original_checkpoint(run_dir, epoch)
    if found is None:
        return None
    folder, path, checkpoint = found
    run = convert_original(folder, path, checkpoint["state_dict"])
    logger.info(
        f"{path}: prompts of the original {run.method} code (epoch {checkpoint.get('epoch')}); "
        f"{len(run.state_dict)} tensors mapped, ignored {len(run.ignored['buffers'])} class-name buffers and "
        f"{run.ignored['frozen CLIP tensors']} frozen CLIP tensors"
    )
    return run


def text_prefix(model):
    """Where a trainer's model keeps its text PromptLearner: '' (the model itself) or e.g. 'text.'."""
    from .prompt_layer import PromptLearner

    for name, module in model.named_modules():
        if isinstance(module, PromptLearner):
            return f"{name}." if name else ""
    return None


def model_name_of(run, model):
    """A function from the run's names to ``model``'s parameter names (the text learner may sit at its root)."""
    prefix = text_prefix(model)
    if prefix is None:
        raise UserError(f"this trainer has no text prompts to load {run.path} into")
    return lambda k: prefix + k[len("text."):] if k.startswith("text.") else k


def compare_frozen(run, backbone_model):
    """Whether the checkpoint's frozen CLIP equals the backbone: True, False, or None when it holds none."""
    if not run.frozen:
        return None
    own = backbone_model.state_dict()
    shared = [k for k in run.frozen if k in own]
    if not shared:
        return False
    return all(own[k].shape == run.frozen[k].shape and torch.equal(own[k].float().cpu(), run.frozen[k].float())
               for k in shared)


def load_original_model(trainer, directory, epoch=None):
    """``--model-dir`` for an original run: load its prompts into ``trainer``; False if it is no original run."""
    run = read_original_run(directory, epoch)
    if run is None:
        return False
    name = trainer.get_model_names()[0]
    trainer_name = trainer.cfg.TRAINER.NAME
    if trainer_name != run.method:
        raise UserError(
            f"--model-dir {directory} holds prompts of the original {run.method} code; evaluate them with "
            f"--trainer {run.method}"
        )
    model = trainer._models[name]
    rename = model_name_of(run, model)
    state_dict = {rename(k): v for k, v in run.state_dict.items()}
    wanted = [k for k, p in model.named_parameters() if p.requires_grad]
    missing = [k for k in wanted if k not in state_dict]
    if missing:
        raise UserError(
            f"{run.path} has no {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} for this "
            f"{trainer_name} run ({len(state_dict)} tensors there, {len(wanted)} here); use the original run's "
            f"settings (number of context tokens, prompt depth)"
        )
    trainer._load_state(name, state_dict, run.path)
    match = compare_frozen(run, trainer.backbone.model)
    if match is False:
        logger.info(f"warning: the frozen CLIP saved in {run.path} differs from backbone {trainer.cfg.MODEL.BACKBONE.NAME}; "
                    f"the prompts were trained on another backbone")
    record = run.record()
    record["loaded"] = {rename(k): v for k, v in record["loaded"].items()}
    trainer.run_info["original_checkpoint"] = {**record, "frozen_clip_matches_backbone": match}
    return True
