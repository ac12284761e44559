"""Golden tests of the feature-based few-shot methods against computations written from their definitions
(numpy, float64) on tiny features."""
import math

import numpy as np
import torch
import torch.nn.functional as F

from clipkit import feature_methods as fm

# float32 arithmetic on values of order 1-100: relative rounding of a few float32 ulps.
F32 = 1e-5


def normalized(gen, *shape):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float32), dim=-1)


def np_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def np_cross_entropy(logits, labels):
    return float(-np.log(np_softmax(logits)[np.arange(len(labels)), labels]).mean())


def toy(seed=0, n_cls=3, shots=4, dim=8, n_val=6):
    gen = torch.Generator().manual_seed(seed)
    text = normalized(gen, n_cls, dim)
    labels = torch.arange(n_cls).repeat_interleave(shots)
    feats = F.normalize(text[labels] + 0.8 * torch.randn(len(labels), dim, generator=gen), dim=-1)
    val_labels = torch.arange(n_cls).repeat(n_val // n_cls + 1)[:n_val]
    val = F.normalize(text[val_labels] + 0.8 * torch.randn(n_val, dim, generator=gen), dim=-1)
    return feats, labels, val, val_labels, text


def test_tip_adapter_logits_match_their_definition():
    feats, labels, val, _, text = toy()
    keys, values = fm.cache_model(feats.unsqueeze(0), labels, 3)
    alpha, beta, scale = 1.7, 5.3, 85.2
    got = fm.tip_logits(val, keys, values, text, alpha, beta, scale).numpy()
    f, k, w = val.double().numpy(), keys.double().numpy(), text.double().numpy()
    expected = np.zeros((len(f), 3))
    for i in range(len(f)):
        for c in range(3):
            cache = sum(math.exp(-beta * (1 - f[i] @ k[j])) for j in range(len(k)) if labels[j] == c)
            expected[i, c] = scale * f[i] @ w[c] + alpha * cache
    np.testing.assert_allclose(got, expected, rtol=F32, atol=F32 * np.abs(expected).max())


def test_tip_adapter_search_finds_the_first_best_pair_of_the_grids():
    feats, labels, val, val_labels, text = toy(seed=3, shots=2)
    keys, values = fm.cache_model(feats.unsqueeze(0), labels, 3)
    betas, alphas = fm.search_grid(7, 10), fm.search_grid(3, 10)
    assert betas[0] == 0.1 and abs(betas[1] - (0.1 + 6.9 / 10)) < 1e-12 and len(alphas) == 10
    beta, alpha, acc = fm.tip_search(val, val_labels, keys, values, text, 50.0, betas, alphas)
    best, pair = -1.0, None
    for b in betas:
        for a in alphas:
            logits = fm.tip_logits(val, keys, values, text, a, b, 50.0)
            score = (logits.argmax(1) == val_labels).double().mean().item() * 100
            if score > best:
                best, pair = score, (b, a)
    assert (beta, alpha) == pair and abs(acc - best) < 1e-4


def test_tip_adapter_f_key_step_matches_the_gradient_and_adamw_from_their_definitions():
    feats, labels, _, _, text = toy(seed=1)
    keys0, values = fm.cache_model(feats.unsqueeze(0), labels, 3)
    keys = torch.nn.Parameter(keys0.clone())
    lr, eps, wd, alpha, beta, scale = 1e-3, 1e-4, 0.01, 2.0, 3.0, 50.0
    optim = torch.optim.AdamW([keys], lr=lr, eps=eps, weight_decay=wd)
    loss = fm.tip_f_step(keys, optim, feats, labels, values, text, alpha, beta, scale)

    f, k, v, w, y = (t.double().numpy() for t in (feats, keys0, values, text, labels))
    y = y.astype(int)
    a = np.exp(-beta * (1 - f @ k.T))                       # (n, NK)
    logits = scale * f @ w.T + alpha * a @ v
    g = (np_softmax(logits) - np.eye(3)[y]) / len(y)        # dL/dlogits
    grad = beta * ((alpha * g @ v.T) * a).T @ f             # dL/dK
    # AdamW's first step: decoupled decay, then m/(sqrt(v)+eps) with bias correction = g/(|g|+eps).
    expected = k * (1 - lr * wd) - lr * grad / (np.abs(grad) + eps)
    assert abs(loss - np_cross_entropy(logits, y)) < F32 * max(1.0, loss)
    np.testing.assert_allclose(keys.detach().double().numpy(), expected, rtol=0, atol=lr * F32 * 10 + 1e-7)
    assert not torch.equal(keys.detach(), keys0)


def test_clip_adapter_step_matches_finite_differences_of_its_definition():
    torch.manual_seed(0)
    feats, labels, _, _, text = toy(seed=2, dim=8)
    adapter = fm.CLIPAdapter(8, reduction=2, alpha=0.3).double()
    down0, up0 = adapter.down.weight.detach().clone().numpy(), adapter.up.weight.detach().clone().numpy()
    f, w, y, scale, lr = feats.double().numpy(), text.double().numpy(), labels.numpy(), 20.0, 0.5

    def loss_of(down, up):
        h = np.maximum(np.maximum(f @ down.T, 0) @ up.T, 0)
        x = 0.3 * h + 0.7 * f
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        return np_cross_entropy(scale * x @ w.T, y)

    def numeric_grad(which):
        params = [down0.copy(), up0.copy()]
        grad = np.zeros_like(params[which])
        for idx in np.ndindex(grad.shape):
            hi, lo = [p.copy() for p in params], [p.copy() for p in params]
            hi[which][idx] += 1e-6
            lo[which][idx] -= 1e-6
            grad[idx] = (loss_of(*hi) - loss_of(*lo)) / 2e-6
        return grad

    optim = torch.optim.SGD(adapter.parameters(), lr=lr)
    loss = torch.nn.functional.cross_entropy(fm.clip_adapter_logits(adapter, feats.double(), text.double(), scale), labels)
    optim.zero_grad()
    loss.backward()
    optim.step()
    assert abs(loss.item() - loss_of(down0, up0)) < 1e-10
    # Central differences in float64: error about h^2 * third derivative, far below 1e-6.
    np.testing.assert_allclose(adapter.down.weight.detach().numpy(), down0 - lr * numeric_grad(0), atol=1e-6)
    np.testing.assert_allclose(adapter.up.weight.detach().numpy(), up0 - lr * numeric_grad(1), atol=1e-6)


def test_clip_adapter_schedule_is_one_cosine_over_the_run():
    assert fm.cosine_lr(0.01, 0, 40) == 0.01 and abs(fm.cosine_lr(0.01, 20, 40) - 0.005) < 1e-12
    assert fm.cosine_lr(0.01, 40, 40) < 1e-12 and fm.cosine_lr(0.01, 30, 40) < fm.cosine_lr(0.01, 25, 40)


def lp_reference_search(x, y, vx, vy):
    """CLIP's linear-probe search written out: coarse grid, then 8 halvings of a log interval."""
    from sklearn.linear_model import LogisticRegression

    def acc(c):
        clf = LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(x, y)
        return (clf.predict(vx) == vy).mean(), clf

    coarse = [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6]
    scores = [acc(c)[0] for c in coarse]
    peak = coarse[scores.index(max(scores))]
    lo, hi = np.log10(peak) - 1, np.log10(peak) + 1
    for _ in range(8):
        (a_lo, clf_lo), (a_hi, clf_hi) = acc(10 ** lo), acc(10 ** hi)
        if a_hi > a_lo:
            chosen, clf, lo = 10 ** hi, clf_hi, (lo + hi) / 2
        else:
            chosen, clf, hi = 10 ** lo, clf_lo, (lo + hi) / 2
    return chosen, clf


def test_lp_regularization_search_on_a_separable_toy_set():
    gen = torch.Generator().manual_seed(0)
    centers = 3 * torch.eye(4)[:3]
    labels = torch.arange(3).repeat_interleave(5)
    feats = F.normalize(centers[labels] + 0.2 * torch.randn(15, 4, generator=gen), dim=-1)
    val_labels = torch.arange(3).repeat(3)
    val = F.normalize(centers[val_labels] + 0.2 * torch.randn(9, 4, generator=gen), dim=-1)
    c, clf, history = fm.lp_search(feats, labels, val, val_labels)
    ref_c, ref_clf = lp_reference_search(feats.double().numpy(), labels.numpy(), val.double().numpy(), val_labels.numpy())
    assert math.isclose(c, ref_c, rel_tol=1e-9)
    # Separable: the coarse pass reaches 100% at its first value, and so does the chosen classifier.
    assert history[0] == (1e6, 100.0) and fm.probe_accuracy(clf, val, val_labels) == 100.0
    assert len(history) == 7 + 2 * 8 and 1e5 <= c <= 1e7
    np.testing.assert_allclose(clf.coef_, ref_clf.coef_, rtol=1e-6, atol=1e-8)
    assert fm.probe_logits(clf, val).argmax(1).tolist() == val_labels.tolist()


def test_lp_search_on_noisy_data_follows_the_reference_search():
    # Noisy 2-class data, where the validation accuracy depends on C: the same C and classifier as the reference.
    feats, labels, val, val_labels, _ = toy(seed=5, n_cls=2, shots=8, dim=16, n_val=16)
    c, clf, history = fm.lp_search(feats, labels, val, val_labels)
    ref_c, ref_clf = lp_reference_search(feats.double().numpy(), labels.numpy(), val.double().numpy(), val_labels.numpy())
    assert math.isclose(c, ref_c, rel_tol=1e-9)
    assert fm.probe_logits(clf, val).shape == (16, 2)
    assert (clf.predict(val.double().numpy()) == ref_clf.predict(val.double().numpy())).all()
    assert history[-2:][0][1] <= history[-1][1] or math.isclose(history[-2][0], c)


def test_lpp_initialization_and_step_sizes_match_their_definitions():
    feats, labels, _, _, text = toy(seed=4, shots=3)
    f, w, y = feats.double().numpy(), text.double().numpy(), labels.numpy()
    own = [np.mean([f[i] @ w[c] for i in range(len(y)) if y[i] == c]) for c in range(3)]
    assert abs(fm.lpp_init_alpha(feats, labels, text, 3) - 250 * np.mean(own)) < F32 * 250
    lr_w, lr_alpha = fm.lpp_step_sizes(feats, text)
    assert math.isclose(lr_w, 4 * len(y) / np.linalg.eigvalsh(f.T @ f).max(), rel_tol=1e-5)
    assert math.isclose(lr_alpha, len(y) / (4 * max(sum((f[i] @ w[c]) ** 2 for i in range(len(y))) for c in range(3))),
                        rel_tol=1e-5)
    sums = np.stack([f[y == c].sum(0) for c in range(3)])
    np.testing.assert_allclose(fm.class_sums(feats, labels, 3).numpy(), sums, atol=F32 * 4)


def test_one_lpp_update_matches_its_gradients_and_step_sizes():
    feats, labels, _, _, text = toy(seed=6, shots=3)
    model = fm.lpp_classifier(feats, labels, text, 3, torch.Generator().manual_seed(0)).double()
    feats64, text64 = feats.double(), text.double()
    W, b, a = (t.detach().clone().numpy() for t in (model.weight, model.bias, model.alpha))
    lr_w, lr_alpha = fm.lpp_step_sizes(feats64, text64)
    optim = torch.optim.SGD([model.weight, model.bias], lr=lr_w, momentum=0.9)
    model.alpha.grad = torch.full_like(model.alpha, 123.0)  # a stale gradient must not leak into the update
    loss = fm.lpp_update(model, optim, feats64, labels, text64, lr_alpha, update_alpha=True)

    f, w, y = feats64.numpy(), text64.numpy(), labels.numpy()
    t = f @ w.T
    logits = f @ W.T + b + a * t
    g = (np_softmax(logits) - np.eye(3)[y]) / len(y)
    assert abs(loss - np_cross_entropy(logits, y)) < 1e-12
    # First momentum step: the buffer is the gradient itself.
    np.testing.assert_allclose(model.weight.detach().numpy(), W - lr_w * g.T @ f, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(model.bias.detach().numpy(), b - lr_w * g.sum(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.alpha.detach().numpy(), a - lr_alpha * (g * t).sum(0), rtol=1e-10, atol=1e-10)

    # The next alpha update uses only that iteration's gradient (no accumulation across iterations).
    fm.lpp_update(model, optim, feats64, labels, text64, lr_alpha, update_alpha=False)
    a1 = model.alpha.detach().clone().numpy()
    W2, b2 = model.weight.detach().numpy(), model.bias.detach().numpy()
    logits2 = f @ W2.T + b2 + a1 * t
    g2 = (np_softmax(logits2) - np.eye(3)[y]) / len(y)
    fm.lpp_update(model, optim, feats64, labels, text64, lr_alpha, update_alpha=True)
    np.testing.assert_allclose(model.alpha.detach().numpy(), a1 - lr_alpha * (g2 * t).sum(0), rtol=1e-10, atol=1e-10)


def test_lpp_training_keeps_the_best_validation_iteration():
    feats, labels, val, val_labels, text = toy(seed=7, shots=4)
    model = fm.lpp_classifier(feats, labels, text, 3, torch.Generator().manual_seed(0))
    start = fm.accuracy(model(feats, text), labels)
    _, _, best_it = fm.train_lpp(model, feats, labels, text, iterations=30, alpha_every=10, val=(val, val_labels))
    assert 0 <= best_it < 30
    assert fm.accuracy(model(feats, text), labels) >= start
