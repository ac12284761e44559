"""Optimizers and learning-rate schedules with Dassl's names and semantics."""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import _LRScheduler

from .errors import UserError

AVAILABLE_OPTIMIZERS = ("sgd", "adam", "adamw")
AVAILABLE_SCHEDULERS = ("single_step", "multi_step", "cosine", "constant")


def _trainable(model_or_params):
    if isinstance(model_or_params, torch.nn.Module):
        params = [p for p in model_or_params.parameters() if p.requires_grad]
    else:
        params = [p for p in model_or_params if getattr(p, "requires_grad", True)]
    if not params:
        raise UserError("the model has no trainable parameters for the optimizer")
    return params


def build_optimizer(model, optim_cfg, param_groups=None):
    """SGD, Adam or AdamW over the trainable parameters of ``model`` (or ``param_groups``)."""
    name = optim_cfg.NAME.lower()
    if name not in AVAILABLE_OPTIMIZERS:
        raise UserError(f"unknown OPTIM.NAME '{optim_cfg.NAME}'; available: {', '.join(AVAILABLE_OPTIMIZERS)}")
    params = param_groups if param_groups is not None else _trainable(model)
    lr, wd = optim_cfg.LR, optim_cfg.WEIGHT_DECAY
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim_cfg.MOMENTUM, weight_decay=wd,
                               dampening=optim_cfg.SGD_DAMPNING, nesterov=optim_cfg.SGD_NESTEROV)
    betas = (optim_cfg.ADAM_BETA1, optim_cfg.ADAM_BETA2)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=betas)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas)


class _BaseWarmupScheduler(_LRScheduler):
    """Runs ``successor`` after ``warmup_epoch`` epochs of warm-up."""

    def __init__(self, optimizer, successor, warmup_epoch, last_epoch=-1):
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        super().__init__(optimizer, last_epoch)

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
            self.last_epoch += 1
        else:
            super().step(epoch)

    def state_dict(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "successor")}
        state["successor"] = self.successor.state_dict()
        return state

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.successor.load_state_dict(state_dict.pop("successor"))
        self.__dict__.update(state_dict)


class ConstantWarmupScheduler(_BaseWarmupScheduler):
    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
        self.cons_lr = cons_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


class LinearWarmupScheduler(_BaseWarmupScheduler):
    def __init__(self, optimizer, successor, warmup_epoch, min_lr, last_epoch=-1):
        self.min_lr = min_lr
        super().__init__(optimizer, successor, warmup_epoch, last_epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        if self.last_epoch == 0:
            return [self.min_lr for _ in self.base_lrs]
        return [lr * self.last_epoch / self.warmup_epoch for lr in self.base_lrs]


def build_lr_scheduler(optimizer, optim_cfg):
    """Per-epoch schedule: cosine, single_step, multi_step or constant, with optional warm-up."""
    name = optim_cfg.LR_SCHEDULER
    if name not in AVAILABLE_SCHEDULERS:
        raise UserError(f"unknown OPTIM.LR_SCHEDULER '{name}'; available: {', '.join(AVAILABLE_SCHEDULERS)}")
    max_epoch = optim_cfg.MAX_EPOCH
    stepsize = optim_cfg.STEPSIZE
    if name == "single_step":
        step = stepsize[0] if isinstance(stepsize, (list, tuple)) else stepsize
        step = max_epoch if step is None or step <= 0 else step
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=optim_cfg.GAMMA)
    elif name == "multi_step":
        milestones = [s for s in (stepsize if isinstance(stepsize, (list, tuple)) else [stepsize]) if s > 0]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=optim_cfg.GAMMA)
    elif name == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=float(max(max_epoch, 1)))
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)

    if optim_cfg.WARMUP_EPOCH > 0:
        if not optim_cfg.WARMUP_RECOUNT:
            scheduler.last_epoch = optim_cfg.WARMUP_EPOCH
        if optim_cfg.WARMUP_TYPE == "constant":
            scheduler = ConstantWarmupScheduler(optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_CONS_LR)
        elif optim_cfg.WARMUP_TYPE == "linear":
            scheduler = LinearWarmupScheduler(optimizer, scheduler, optim_cfg.WARMUP_EPOCH, optim_cfg.WARMUP_MIN_LR)
        else:
            raise UserError(f"OPTIM.WARMUP_TYPE must be constant or linear, not '{optim_cfg.WARMUP_TYPE}'")
    return scheduler
