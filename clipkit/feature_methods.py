"""Few-shot methods that learn on frozen, L2-normalized CLIP features (no image is encoded here).

Each function takes features as tensors and returns tensors or plain numbers, so the
methods can be checked against their definitions on tiny inputs and run from cached
features. Shapes: ``feats`` (n, D) normalized image features, ``labels`` (n,) class
ids, ``text`` (C, D) normalized class text features (the zero-shot classifier).

- CLIP-Adapter (Gao et al. 2021): a residual bottleneck adapter on the image feature.
- Tip-Adapter / Tip-Adapter-F (Zhang et al. 2022): a cache model of the few shots
  blended with the zero-shot logits; -F fine-tunes the cache keys.
- LP: L2-regularized logistic regression, regularization chosen on validation
  (CLIP's protocol as CoOp's linear-probe code runs it).
- LP++ (Huang et al. 2024): a linear classifier plus class-wise multiples of the text
  logits, trained by block-coordinate gradient steps with data-driven step sizes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def accuracy(logits, labels):
    """Top-1 accuracy in percent."""
    return (logits.argmax(dim=1) == labels).float().mean().item() * 100.0


# ---------------------------------------------------------------- CLIP-Adapter
class CLIPAdapter(nn.Module):
    """Bottleneck Linear(D, D/r) -> ReLU -> Linear(D/r, D) -> ReLU, no biases; the blend ratio ``alpha``.

    The adapted feature is alpha * adapter(f) + (1 - alpha) * f, normalized again before the
    text classifier (CLIP-Adapter's own code normalizes after the blend).
    """

    def __init__(self, dim, reduction=4, alpha=0.5):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(hidden, dim, bias=False)
        self.alpha = float(alpha)

    def forward(self, feats):
        """Adapted, normalized features (n, D) of normalized features (n, D)."""
        adapted = F.relu(self.up(F.relu(self.down(feats))))
        return F.normalize(self.alpha * adapted + (1 - self.alpha) * feats, dim=-1)


def clip_adapter_logits(adapter, feats, text, scale):
    """scale * adapter(f) . text: (n, C)."""
    return scale * adapter(feats) @ text.t()


def cosine_lr(base_lr, step, total_steps):
    """Cosine annealing from ``base_lr`` to 0 over ``total_steps`` steps (step 0 = base_lr)."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def batches(n, batch_size, generator):
    """Shuffled index batches covering range(n) once (the last one may be smaller)."""
    order = torch.randperm(n, generator=generator)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def train_clip_adapter(adapter, views, labels, text, scale, lr, batch_size, generator, log=None):
    """SGD (no momentum) with cross-entropy, one epoch per augmented view in ``views`` (epochs, n, D).

    The learning rate follows a cosine over all iterations of the run. Returns the mean loss per epoch.
    """
    epochs, n = views.shape[0], views.shape[1]
    per_epoch = math.ceil(n / batch_size)
    optim = torch.optim.SGD(adapter.parameters(), lr=lr)
    losses, step = [], 0
    for epoch in range(epochs):
        total = 0.0
        for index in batches(n, batch_size, generator):
            for group in optim.param_groups:
                group["lr"] = cosine_lr(lr, step, epochs * per_epoch)
            loss = F.cross_entropy(clip_adapter_logits(adapter, views[epoch][index], text, scale), labels[index])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            total += loss.item() * len(index)
            step += 1
        losses.append(total / n)
        if log:
            log(f"epoch {epoch + 1}/{epochs} loss {losses[-1]:.4f}")
    return losses


# ---------------------------------------------------------------- Tip-Adapter
def tip_logits(feats, keys, values, text, alpha, beta, scale):
    """Tip-Adapter's logits (n, C): scale * f.text + alpha * exp(-beta * (1 - f.keys)) @ values.

    ``keys`` (NK, D) normalized cache keys, ``values`` (NK, C) one-hot labels of the keys.
    """
    affinity = feats @ keys.t()
    return scale * feats @ text.t() + alpha * torch.exp(-beta * (1 - affinity)) @ values


def search_grid(scale, steps):
    """Tip-Adapter's search grid: ``steps`` values from 0.1 in steps of (scale - 0.1) / steps."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(int(steps))]


@torch.no_grad()
def tip_search(feats, labels, keys, values, text, scale, betas, alphas):
    """The (beta, alpha) of the grids with the best accuracy on (feats, labels); the first best wins.

    Returns (beta, alpha, accuracy). Betas are the outer loop, as in Tip-Adapter's search.
    """
    clip = scale * feats @ text.t()
    affinity = feats @ keys.t()
    alpha_t = torch.tensor(alphas, dtype=feats.dtype, device=feats.device)
    best = (None, None, -1.0)
    for beta in betas:
        cache = torch.exp(-beta * (1 - affinity)) @ values  # (n, C)
        logits = clip.unsqueeze(0) + alpha_t.view(-1, 1, 1) * cache.unsqueeze(0)  # (A, n, C)
        accs = (logits.argmax(dim=2) == labels.unsqueeze(0)).float().mean(dim=1) * 100.0
        i = int(torch.argmax(accs))  # first maximum
        if accs[i].item() > best[2]:
            best = (float(beta), float(alphas[i]), accs[i].item())
    return best


def cache_model(views, labels, n_classes):
    """Tip-Adapter's cache: keys (N, D) = the mean of each image's augmented views (V, N, D), normalized;
    values (N, C) one-hot labels."""
    keys = F.normalize(views.mean(dim=0), dim=-1)
    return keys, F.one_hot(labels, n_classes).to(keys.dtype)


def tip_f_step(keys, optim, feats, labels, values, text, alpha, beta, scale):
    """One fine-tuning step of Tip-Adapter-F's cache keys (a Parameter (NK, D)); returns the loss."""
    loss = F.cross_entropy(tip_logits(feats, keys, values, text, alpha, beta, scale), labels)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    return loss.item()


def train_tip_f(keys, views, labels, values, text, alpha, beta, scale, lr, batch_size, generator, val=None,
                eps=1e-4, weight_decay=0.01, log=None):
    """Fine-tune the cache keys (Parameter (NK, D)) with AdamW and a per-iteration cosine, one epoch per
    augmented view in ``views`` (epochs, n, D).

    With ``val`` (features, labels) the keys of the epoch with the best validation accuracy (the first best)
    are kept; otherwise those of the last epoch. Returns the validation accuracy per epoch.
    """
    epochs, n = views.shape[0], views.shape[1]
    per_epoch = math.ceil(n / batch_size)
    optim = torch.optim.AdamW([keys], lr=lr, eps=eps, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, epochs * per_epoch)
    best_acc, best_keys, history = -1.0, keys.detach().clone(), []
    for epoch in range(epochs):
        total = 0.0
        for index in batches(n, batch_size, generator):
            total += tip_f_step(keys, optim, views[epoch][index], labels[index], values, text, alpha, beta,
                                scale) * len(index)
            sched.step()
        if val is not None:
            with torch.no_grad():
                acc = accuracy(tip_logits(val[0], keys, values, text, alpha, beta, scale), val[1])
            history.append(acc)
            if acc > best_acc:
                best_acc, best_keys = acc, keys.detach().clone()
        if log:
            log(f"epoch {epoch + 1}/{epochs} loss {total / n:.4f}" + (f" val acc {history[-1]:.2f}" if history else ""))
    if val is not None:
        with torch.no_grad():
            keys.copy_(best_keys)
    return history


# ---------------------------------------------------------------- linear probe
def fit_logistic(feats, labels, c):
    """sklearn's L2 logistic regression (lbfgs, 1000 iterations) with inverse regularization ``c``."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(solver="lbfgs", max_iter=1000, C=float(c)).fit(
        feats.detach().double().cpu().numpy(), labels.cpu().numpy())


def probe_accuracy(clf, feats, labels):
    return float((clf.predict(feats.detach().double().cpu().numpy()) == labels.cpu().numpy()).mean() * 100.0)


def lp_search(feats, labels, val_feats, val_labels, grid=(1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6), steps=8):
    """The regularization search of CLIP's linear probe, as CoOp's linear-probe code runs it.

    A coarse pass over ``grid`` picks C* (best validation accuracy, the first best); then ``steps`` rounds
    of a binary search in log space on [C*/10, 10 C*]: each round fits both ends, keeps the better
    (the left on ties) and halves the interval towards it. Returns (C, classifier, history) with the
    classifier and C of the last round; history lists (C, validation accuracy) in the order fitted.
    """
    history = []

    def evaluate(c):
        clf = fit_logistic(feats, labels, c)
        acc = probe_accuracy(clf, val_feats, val_labels)
        history.append((float(c), acc))
        return clf, acc

    coarse = [evaluate(c)[1] for c in grid]
    peak = grid[int(np.argmax(coarse))]
    left, right = math.log10(peak) - 1, math.log10(peak) + 1
    c_final, clf_final = peak, None
    for _ in range(steps):
        clf_left, acc_left = evaluate(10 ** left)
        clf_right, acc_right = evaluate(10 ** right)
        middle = 0.5 * (left + right)
        if acc_left < acc_right:
            c_final, clf_final, left = 10 ** right, clf_right, middle
        else:
            c_final, clf_final, right = 10 ** left, clf_left, middle
    if clf_final is None:
        clf_final = fit_logistic(feats, labels, c_final)
    return c_final, clf_final, history


def probe_logits(clf, feats):
    """Decision values (n, C) of a fitted logistic regression, as a float tensor on ``feats``' device."""
    scores = clf.decision_function(feats.detach().double().cpu().numpy())
    if scores.ndim == 1:  # two classes: sklearn gives the score of class 1 only
        scores = np.stack([-scores, scores], axis=1) / 2
    return torch.from_numpy(scores).float().to(feats.device)


# ---------------------------------------------------------------- LP++
def class_sums(feats, labels, n_classes):
    """Per-class sum of features (C, D): LP++'s initial visual prototypes."""
    return F.one_hot(labels, n_classes).to(feats.dtype).t() @ feats


def lpp_init_alpha(feats, labels, text, n_classes, scale=250.0):
    """LP++'s initial blending multiplier: ``scale`` times the mean over classes of the mean text logit
    f_n . w_c of class c's own samples."""
    own = (feats @ text.t()).gather(1, labels.view(-1, 1)).squeeze(1)
    per_class = torch.zeros(n_classes, dtype=feats.dtype, device=feats.device).index_add_(0, labels, own)
    counts = torch.bincount(labels, minlength=n_classes).clamp(min=1).to(feats.dtype)
    return float(scale * (per_class / counts).mean())


def lpp_step_sizes(feats, text):
    """LP++'s step sizes: (lr_w, lr_alpha) = (4N / lambda_max(F^T F), N / (4 max_c sum_n (f_n . w_c)^2))."""
    n = feats.shape[0]
    gram = (feats.t() @ feats).double().cpu()
    lr_w = 4 * n / float(torch.linalg.eigvalsh(gram).max())
    lr_alpha = n / (4 * float(((feats @ text.t()) ** 2).sum(dim=0).max()))
    return lr_w, lr_alpha


class LPPClassifier(nn.Module):
    """LP++'s logits: f W^T + b + alpha_c (f . w_c); W (C, D), b (C,), alpha (C,)."""

    def __init__(self, weight, bias, alpha):
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(bias.clone())
        self.alpha = nn.Parameter(alpha.clone())

    def forward(self, feats, text):
        return feats @ self.weight.t() + self.bias + self.alpha * (feats @ text.t())


def lpp_classifier(feats, labels, text, n_classes, generator=None):
    """The initial LP++ model: W = per-class feature sums, b drawn as nn.Linear draws it, alpha = init."""
    dim = feats.shape[1]
    bound = 1 / math.sqrt(dim)
    bias = (torch.rand(n_classes, generator=generator) * 2 - 1) * bound
    alpha = torch.full((n_classes,), lpp_init_alpha(feats, labels, text, n_classes))
    return LPPClassifier(class_sums(feats, labels, n_classes), bias.to(feats), alpha.to(feats))


def lpp_update(model, optim, feats, labels, text, lr_alpha, update_alpha):
    """One LP++ iteration: a full-batch step on (W, b) with ``optim``; with ``update_alpha`` also
    alpha <- alpha - lr_alpha * grad alpha, the gradient of this iteration's loss (at the same point
    as the step on W). Returns the loss."""
    loss = F.cross_entropy(model(feats, text), labels)
    optim.zero_grad(set_to_none=True)
    model.alpha.grad = None
    loss.backward()
    optim.step()
    if update_alpha:
        with torch.no_grad():
            model.alpha -= lr_alpha * model.alpha.grad
    return loss.item()


def train_lpp(model, feats, labels, text, iterations, alpha_every, val=None, momentum=0.9, log=None):
    """LP++'s training: ``iterations`` full-batch SGD steps (momentum, lr_w) on (W, b), alpha updated every
    ``alpha_every`` iterations. With ``val`` the state of the iteration with the best validation accuracy is
    kept (the later one on ties). Returns (lr_w, lr_alpha, best iteration)."""
    lr_w, lr_alpha = lpp_step_sizes(feats, text)
    optim = torch.optim.SGD([model.weight, model.bias], lr=lr_w, momentum=momentum)
    best_acc, best_state, best_it = -1.0, None, iterations - 1
    for it in range(iterations):
        loss = lpp_update(model, optim, feats, labels, text, lr_alpha, (it + 1) % alpha_every == 0)
        if val is not None:
            with torch.no_grad():
                acc = accuracy(model(val[0], text), val[1])
            if acc >= best_acc:
                best_acc, best_it = acc, it
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if log and ((it + 1) % 50 == 0 or it + 1 == iterations):
            log(f"iteration {it + 1}/{iterations} loss {loss:.4f}" + (f" best val acc {best_acc:.2f}" if val else ""))
    if best_state is not None:
        model.load_state_dict(best_state)
    return lr_w, lr_alpha, best_it
