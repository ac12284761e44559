"""Golden equivalence of the prompt layer with the backbones' own encoders."""
import pytest
import torch

from conftest import TINY_BACKBONES, assert_close, float_tolerance
from clipkit.prompt_layer import ImageEncoder, PromptLearner, PromptTokenizer, TextEncoder, place

TEXTS = ["a fundus image of glaucoma.", "a pathology image of adipose tissue.", "x", "an oct retinal image of drusen with many words"]


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_text_encoder_reproduces_encode_text(backbones, name):
    bb = backbones(name)
    te = TextEncoder(bb.model)
    ids = PromptTokenizer(bb.tokenizer, bb.context_length)(TEXTS)
    with torch.no_grad():
        assert torch.equal(te(te.embed(ids), ids, truncate=False), bb.model.encode_text(ids))
        assert_close(te(te.embed(ids), ids), bb.model.encode_text(ids))


@pytest.mark.parametrize("name", TINY_BACKBONES + ("tiny-timm-clip",))
def test_image_encoder_reproduces_encode_image(backbones, name):
    """Without prompts, and through the prompt path with zero prompt tokens."""
    bb = backbones(name)
    encoder = ImageEncoder(bb.model)
    assert encoder.supports_prompts and encoder.kind == ("timm" if "timm" in name else "native")
    images = torch.randn(3, 3, *bb.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = bb.model.encode_image(images)
        assert torch.equal(encoder(images), reference)
        assert torch.equal(encoder(images, [torch.zeros(0, encoder.width)] * 3), reference)


@pytest.mark.parametrize("name", TINY_BACKBONES)
@pytest.mark.parametrize("n_ctx, keep", [(None, False), (2, True)])
def test_template_initialized_context_adds_nothing(backbones, name, n_ctx, keep):
    """Depth 1, zero steps, context from the template's own words (all of them, or the first two with
    the rest kept as fixed text): ids and features equal the plain template's."""
    bb = backbones(name)
    te, tok = TextEncoder(bb.model), PromptTokenizer(bb.tokenizer, bb.context_length)
    n = len(tok.encode("a fundus image of")) if n_ctx is None else n_ctx
    learner = PromptLearner(te, tok, n_ctx=n, ctx_init="a fundus image of", depth=1, keep_init_words=keep)
    assert learner.n_ctx == n
    tokens = learner.tokens_for(["glaucoma", "age-related_macular_degeneration"], "a fundus image of {}.")
    assert tokens.texts == ["a fundus image of glaucoma.", "a fundus image of age-related macular degeneration."]
    assert torch.equal(tokens.ids, tok(tokens.texts))
    assert tokens.ctx_mask.sum(dim=1).tolist() == [n, n]
    with torch.no_grad():
        prompted = learner(te, tokens)
        plain = bb.model.encode_text(tok(tokens.texts))
    assert_close(prompted, plain)


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_deep_prompts_change_features_and_get_gradients(backbones, name):
    bb = backbones(name)
    te, tok = TextEncoder(bb.model), PromptTokenizer(bb.tokenizer, bb.context_length)
    torch.manual_seed(0)
    learner = PromptLearner(te, tok, ctx_init="a fundus image of", depth=3)
    tokens = learner.tokens_for(["glaucoma", "cataract"], "a fundus image of {}.")
    out = learner(te, tokens)
    plain = bb.model.encode_text(tok(tokens.texts))
    assert float((out - plain).detach().abs().max()) > 100 * float_tolerance(plain.detach())
    out.pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learner.parameters())
    assert all(p.grad is None for p in bb.model.parameters())


def test_deep_prompt_count_cannot_exceed_layers(backbones):
    bb = backbones("tiny-clip")
    te, tok = TextEncoder(bb.model), PromptTokenizer(bb.tokenizer, bb.context_length)
    from core.errors import UserError

    with pytest.raises(UserError, match="exceeds"):
        PromptLearner(te, tok, n_ctx=2, depth=te.num_layers + 1)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_class_token_positions_place_context_where_asked(backbones, position):
    bb = backbones("tiny-clip")
    te, tok = TextEncoder(bb.model), PromptTokenizer(bb.tokenizer, bb.context_length)
    learner = PromptLearner(te, tok, n_ctx=4, position=position, class_specific=True, n_cls=2)
    tokens = learner.tokens_for(["glaucoma", "cat"], "{}.")
    name_ids = tok.encode("glaucoma")
    row = tokens.ids[0].tolist()
    ctx_positions = tokens.ctx_mask[0].nonzero().flatten().tolist()
    name_start = row.index(name_ids[0])
    assert len(ctx_positions) == 4
    if position == "end":
        assert max(ctx_positions) < name_start
    elif position == "front":
        assert min(ctx_positions) > name_start
    else:
        assert min(ctx_positions) < name_start < max(ctx_positions)
    assert learner(te, tokens).shape == (2, bb.model.text_projection.shape[1])


def test_place_replaces_only_masked_positions():
    x = torch.zeros(2, 5, 3)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 0, 1, 1, 0]], dtype=torch.bool)
    values = torch.arange(6.0).view(2, 3)
    out = place(x, mask, values)
    assert torch.equal(out[0, 1], values[0]) and torch.equal(out[1, 3], values[1])
    assert out[~mask].abs().sum() == 0
    assert x.abs().sum() == 0  # not in place


@pytest.mark.parametrize("name", TINY_BACKBONES + ("tiny-timm-clip",))
def test_visual_prompts_extend_the_image_encoder(backbones, name):
    bb = backbones(name)
    ie = ImageEncoder(bb.model)
    images = torch.randn(2, 3, *bb.image_size)
    prompts = [torch.randn(2, ie.width, requires_grad=True) for _ in range(3)]
    out = ie(images, prompts)
    assert out.shape == bb.model.encode_image(images).shape
    out.sum().backward()
    assert all(p.grad is not None for p in prompts)


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_truncated_encoding_equals_full_context(backbones, name):
    """Rows of different lengths, deep prompts, per-row context: cutting the batch to its longest
    real sequence gives the full-context features, and the cut is really shorter."""
    bb = backbones(name)
    te, tok = TextEncoder(bb.model), PromptTokenizer(bb.tokenizer, bb.context_length)
    torch.manual_seed(0)
    learner = PromptLearner(te, tok, n_ctx=3, depth=3, class_specific=True, n_cls=4)
    tokens = learner.tokens_for(["glaucoma", "age-related_macular_degeneration", "x", "diabetic retinopathy"],
                                "a fundus image of {} with visible lesions.")
    lengths = (tokens.ids != te.pad_id).sum(dim=1)
    assert len(set(lengths.tolist())) > 1
    for rows in ([0, 1, 2, 3], [2, 0], [2], [1, 3]):
        part = tokens.select(rows)
        emb = place(te.embed(part.ids), part.ctx_mask, learner.ctx[rows])
        assert te.used_length(part.ids) == int(lengths[rows].max()) < bb.context_length
        with torch.no_grad():
            cut = te(emb, part.ids, part.ctx_mask, list(learner.deep_ctx))
            full = te(emb, part.ids, part.ctx_mask, list(learner.deep_ctx), truncate=False)
        assert_close(cut, full)
    with torch.no_grad():
        ids = tok(TEXTS)
        assert_close(te(te.embed(ids), ids), te(te.embed(ids), ids, truncate=False))


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_truncated_gradients_equal_full_context(backbones, name):
    bb = backbones(name)
    te, tok = TextEncoder(bb.model), PromptTokenizer(bb.tokenizer, bb.context_length)
    torch.manual_seed(0)
    learner = PromptLearner(te, tok, n_ctx=2, depth=2)
    tokens = learner.tokens_for(["glaucoma", "age-related_macular_degeneration"], "a fundus image of {}.")
    grads = []
    for truncate in (True, False):
        learner.zero_grad()
        emb = place(te.embed(tokens.ids), tokens.ctx_mask, learner.ctx)
        te(emb, tokens.ids, tokens.ctx_mask, list(learner.deep_ctx), truncate=truncate).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in learner.parameters()])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max())) for a, b in zip(*grads))
