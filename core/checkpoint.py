"""Reading prompt checkpoints: tensors and plain values only, never code.

Every load (resume, ``--model-dir``, ``--init-from``, ``MODEL.INIT_WEIGHTS``)
goes through :func:`load_checkpoint`, which unpickles with
``torch.load(..., weights_only=True)``: a file that would need to import or
call anything is refused instead of run. The ``checkpoint`` pointer file of
a model folder may only name a file in that folder (:func:`read_pointer`).
"""
from __future__ import annotations

import os
import pickle
import re
import zipfile

import torch

from .errors import UserError

CHECKPOINT_POINTER = "checkpoint"


def _delete_hint(path):
    pointer = os.path.join(os.path.dirname(path), CHECKPOINT_POINTER)
    return f"delete it (or the pointer {pointer} that names it) and rerun"


def read_pointer(model_dir):
    """Path of the checkpoint named by ``model_dir/checkpoint``, or None without a pointer.

    The name must be a plain file name in ``model_dir`` (no folder, no ``..``,
    no link leading elsewhere): a pointer cannot make a run read an outside file.
    """
    pointer = os.path.join(model_dir, CHECKPOINT_POINTER)
    if not os.path.isfile(pointer):
        return None
    try:
        with open(pointer, encoding="utf-8") as f:
            name = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the checkpoint pointer {pointer} ({type(e).__name__}); delete it and rerun") from None
    folder = os.path.realpath(model_dir)
    path = os.path.join(model_dir, name)
    if (not name or name in (".", "..") or "/" in name or os.sep in name or "\0" in name
            or os.path.dirname(os.path.realpath(path)) != folder):
        raise UserError(
            f"checkpoint pointer {pointer} names '{name[:80]}', which is not a file of {model_dir}; "
            f"a pointer may only name a checkpoint beside it: delete the pointer and rerun"
        )
    return path


def refuse_torchscript(path):
    """A TorchScript archive (a whole scripted model, with code) is never read as a prompt checkpoint: UserError."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return
    if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
        raise UserError(
            f"checkpoint {path} is a TorchScript archive (a whole model with its code), not a prompt checkpoint, and "
            f"was not loaded: give the output folder of a training run (model.pth.tar-<epoch> files)"
        )


def load_checkpoint(path):
    """The dict saved at ``path``, read without running code; ``state_dict`` maps names to tensors."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
    refuse_torchscript(path)  # torch.load would warn, then fail with a paragraph
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # weights_only refuses anything besides tensors and plain values, such as a pickled call.
        raise UserError(
            f"checkpoint {path} holds objects other than tensors and plain values and was not loaded "
            f"(a prompt checkpoint never does; it may be corrupt or crafted): {_delete_hint(path)}"
        ) from None
    except Exception as e:  # a truncated or foreign file
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}; it is incomplete or not a checkpoint): "
                        f"{_delete_hint(path)}") from None
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"checkpoint {path} has no state_dict of named tensors: {_delete_hint(path)}")
    if not state:
        raise UserError(f"checkpoint {path} holds no tensors (empty state_dict): {_delete_hint(path)}")
    problem = _field_problem(checkpoint)
    if problem:
        raise UserError(f"checkpoint {path}: {problem}; it was not written by this program as it stands: {_delete_hint(path)}")
    return checkpoint


# Non-tensor fields a prompt checkpoint may carry -> what each must be (None: the field is absent or unset).
_FIELD_TYPES = {
    "optimizer": (dict,), "scheduler": (dict,), "rng": (dict,), "optim_cfg": (dict,), "settings": (dict,),
    "train_loss": (dict,), "trainer": (str,), "backbone": (str,), "val_result": (int, float, dict),
}


def _a(type_name):
    return ("an " if type_name[0] in "aeiou" else "a ") + type_name


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _field_problem(checkpoint):
    """What is wrong with the plain fields of a checkpoint dict, or None."""
    epoch = checkpoint.get("epoch")
    if epoch is not None and (not _is_int(epoch) or epoch < 1):
        return f"epoch is {epoch!r}, not a count of finished epochs (1 or more)"
    for key, types in _FIELD_TYPES.items():
        value = checkpoint.get(key)
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            return f"{key} is {_a(type(value).__name__)}, not {' or '.join(_a(t.__name__) for t in types)}"
    losses = checkpoint.get("train_loss") or {}
    if not all(isinstance(k, str) and _is_number(v) for k, v in losses.items()):
        return "train_loss is not a mapping of loss names to numbers"
    return None


def resume_problem(checkpoint, path, optimizer, scheduler, max_epoch):
    """What keeps ``checkpoint`` from being resumed with ``optimizer`` and ``scheduler`` (built as for this run).

    The epoch must lie within the run and match the file name; the saved optimizer state must have this
    optimizer's parameter groups, parameters and state shapes; the scheduler state this scheduler's fields.
    Returns a message (no path) or None.
    """
    epoch = checkpoint.get("epoch")
    if epoch is None:
        return "it records no epoch"
    if epoch > max_epoch:
        return f"epoch {epoch} is beyond OPTIM.MAX_EPOCH {max_epoch}"
    named = re.fullmatch(r"model\.pth\.tar-(\d+)", os.path.basename(path))
    if named and int(named[1]) != epoch:
        return f"epoch {epoch} differs from the {int(named[1])} of its file name"
    if optimizer is not None:
        problem = _optimizer_problem(checkpoint.get("optimizer"), optimizer)
        if problem:
            return f"optimizer state {problem}"
    if scheduler is not None:
        saved = checkpoint.get("scheduler")
        problem = _same_structure(saved, scheduler.state_dict(), "scheduler state")
        if problem:
            return problem
        if saved.get("last_epoch", epoch) != epoch:  # trainers step the schedule once per epoch
            return f"the scheduler has run {saved['last_epoch']} epochs, the checkpoint says {epoch}"
    return None


def _optimizer_problem(saved, optimizer):
    if not isinstance(saved, dict):
        return "is missing" if saved is None else f"is {_a(type(saved).__name__)}"
    current = optimizer.state_dict()
    groups, state = saved.get("param_groups"), saved.get("state")
    if set(saved) != set(current) or not isinstance(groups, list) or not isinstance(state, dict):
        return "is not an optimizer state dict (param_groups and state)"
    if len(groups) != len(current["param_groups"]):
        return f"has {len(groups)} parameter groups, this optimizer {len(current['param_groups'])}"
    shapes = {}
    for i, (group, own) in enumerate(zip(groups, current["param_groups"])):
        if not isinstance(group, dict) or set(group) != set(own):
            return f"group {i} has other settings than this optimizer's ({', '.join(sorted(own))})"
        if group["params"] != own["params"]:
            return f"group {i} holds other parameters than this optimizer's ({len(own['params'])})"
        for key, value in group.items():
            problem = key != "params" and _same_structure(value, own[key], f"group {i} {key}")
            if problem:
                return problem
        for index, param in zip(own["params"], optimizer.param_groups[i]["params"]):
            shapes[index] = tuple(param.shape)
    for index, entry in state.items():
        if index not in shapes or not isinstance(entry, dict):
            return f"has state for parameter {index!r}, which this optimizer does not have"
        for key, value in entry.items():
            if value is None:
                continue
            if not torch.is_tensor(value) and not _is_number(value):
                return f"of parameter {index} has {_a(type(value).__name__)} as {key}"
            if torch.is_tensor(value) and value.dim() and (tuple(value.shape) != shapes[index]
                                                           or not value.is_floating_point()):
                return (f"of parameter {index}: {key} is a {str(value.dtype)[6:]} tensor of shape "
                        f"{tuple(value.shape)}, the parameter's shape is {shapes[index]}")
    return None


def _same_structure(saved, current, where):
    """Whether ``saved`` has the structure and value types of ``current`` (numbers interchangeable); message or None."""
    if isinstance(current, dict):
        if saved is None:
            return f"{where} is missing"
        if not isinstance(saved, dict):
            return f"{where} is {_a(type(saved).__name__)}, not a mapping"
        if set(saved) != set(current):
            differing = sorted(set(saved) ^ set(current), key=str)
            return f"{where} has other fields than this run's ({', '.join(map(str, differing[:3]))})"
        for key in current:
            problem = _same_structure(saved[key], current[key], f"{where} {key}")
            if problem:
                return problem
        return None
    if isinstance(current, (list, tuple)):
        if not isinstance(saved, (list, tuple)) or len(saved) != len(current):
            return f"{where} is {saved!r:.40}, not a list of {len(current)}"
        for a, b in zip(saved, current):
            problem = _same_structure(a, b, where)
            if problem:
                return problem
        return None
    if _is_number(current) and _is_number(saved) or type(saved) is type(current):
        if _is_number(saved) and saved != saved:  # NaN
            return f"{where} is not a number"
        if torch.is_tensor(saved) and tuple(saved.shape) != tuple(current.shape):
            return f"{where} has shape {tuple(saved.shape)}, not {tuple(current.shape)}"
        return None
    return f"{where} is {saved!r:.40}, not {_a(type(current).__name__)}"
