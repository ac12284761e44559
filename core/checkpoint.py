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


def load_checkpoint(path):
    """The dict saved at ``path``, read without running code; ``state_dict`` maps names to tensors."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}")
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
    return checkpoint
