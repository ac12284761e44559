"""Each trainer builds its prompt as the original code does: exact token ids and learnable positions.

Expected ids come from the backbone's own tokenizer applied to the prompt text the original
trainer tokenizes (CoOp, MaPLe, IVLP: "{init words} {class}." or "X X ... {class}."; MedPromptCLIP:
"[ctx] {class}."). tiny-clip uses CLIP's BPE, where "fundus" is two tokens.
"""
import pytest
import torch

from conftest import DEMO_CFG, recipe
from core.engine import TRAINER_REGISTRY

CLASS = "Z5"  # the demo's first class; readable "Z5"


def build(name, demo_root, tmp_path, *opts, recipe_name="base2new"):
    import train

    args = train.build_parser().parse_args([
        "--root", demo_root, "--trainer", name, "--dataset-config-file", DEMO_CFG,
        "--config-file", recipe(name, recipe_name), "--output-dir", str(tmp_path), "--seed", "1",
        "MODEL.BACKBONE.NAME", "tiny-clip", "DATASET.NUM_SHOTS", "1", "DATASET.SUBSAMPLE_CLASSES", "base",
        "DEVICE", "cpu", *opts,
    ])
    return TRAINER_REGISTRY.get(name)(train.setup_cfg(args))


def text_learner(trainer):
    return trainer.prompt_learner.text if hasattr(trainer.prompt_learner, "text") else trainer.prompt_learner


def prompt_of(trainer):
    """Token ids and learnable positions of the first class's prompt."""
    if trainer.cfg.TRAINER.NAME == "MedPromptCLIP":
        tokens = trainer.prompt_learner.tokens_for(trainer.classnames, trainer.dataset_entry.template)
    else:
        tokens = trainer.tokens
    assert trainer.classnames[0] == CLASS
    row = tokens.ids[0].tolist()
    length = row.index(trainer.prompt_tokenizer.end_id) + 1
    return row[:length], tokens.ctx_mask[0].nonzero().flatten().tolist()


def expected_ids(trainer, text):
    row = trainer.prompt_tokenizer([text])[0].tolist()
    return row[:row.index(trainer.prompt_tokenizer.end_id) + 1]


def embeddings_of(trainer, words):
    te = trainer.text_encoder
    with torch.no_grad():
        return te.embed(torch.tensor([trainer.prompt_tokenizer.encode(words)]))[0].float()


@pytest.mark.parametrize("name, keys", [("MaPLe", ("N_CTX",)), ("IVLP", ("N_CTX_TEXT",))])
@pytest.mark.parametrize("n_ctx, words", [(2, "a photo of a"), (4, "a fundus image of")])
def test_maple_ivlp_learn_the_first_n_ctx_tokens_of_the_init_words(name, keys, n_ctx, words, demo_root, tmp_path):
    node = name.upper()
    trainer = build(name, demo_root, tmp_path, f"TRAINER.{node}.{keys[0]}", str(n_ctx),
                    f"TRAINER.{node}.CTX_INIT", words)
    ids, learnable = prompt_of(trainer)
    assert ids == expected_ids(trainer, f"{words} Z5.")
    assert learnable == list(range(1, 1 + n_ctx))
    # "a fundus image of" is 5 tokens: the first 4 ("a", "fund", "us", "image") are the context.
    ctx = text_learner(trainer).ctx.detach()
    assert torch.equal(ctx, embeddings_of(trainer, words)[:n_ctx])


def test_ivlp_random_context_when_n_ctx_exceeds_the_init_words(demo_root, tmp_path):
    trainer = build("IVLP", demo_root, tmp_path, "TRAINER.IVLP.N_CTX_TEXT", "6", "TRAINER.IVLP.CTX_INIT", "a photo of a")
    ids, learnable = prompt_of(trainer)
    assert ids == expected_ids(trainer, "X X X X X X Z5.")
    assert learnable == list(range(1, 7))
    assert text_learner(trainer).ctx_init == ""


def test_maple_deeper_couplers_start_as_copies_of_one_layer(demo_root, tmp_path):
    trainer = build("MaPLe", demo_root, tmp_path)
    couplers = trainer.prompt_learner.couplers
    assert len(couplers) == 9
    for c in couplers[2:]:
        assert torch.equal(c.weight, couplers[1].weight) and torch.equal(c.bias, couplers[1].bias)
    assert not torch.equal(couplers[0].weight, couplers[1].weight)
    # Copies, not one shared module: training moves each on its own.
    assert len({id(c.weight) for c in couplers}) == 9


@pytest.mark.parametrize("position, text, learnable", [
    ("end", "X X X X Z5.", [1, 2, 3, 4]),
    ("middle", "X X Z5 X X.", [1, 2, 5, 6]),
    ("front", "Z5 X X X X.", [3, 4, 5, 6]),
])
@pytest.mark.parametrize("csc", [False, True])
def test_coop_random_context_in_each_class_token_position(position, text, learnable, csc, demo_root, tmp_path):
    trainer = build("CoOp", demo_root, tmp_path, "TRAINER.COOP.N_CTX", "4", "TRAINER.COOP.CTX_INIT", "",
                    "TRAINER.COOP.CLASS_TOKEN_POSITION", position, "TRAINER.COOP.CSC", str(csc))
    ids, mask = prompt_of(trainer)
    assert ids == expected_ids(trainer, text) and mask == learnable
    ctx = trainer.prompt_learner.ctx
    assert ctx.shape == ((6, 4, ctx.shape[-1]) if csc else (4, ctx.shape[-1]))


@pytest.mark.parametrize("name", ["CoOp", "CoCoOp"])
@pytest.mark.parametrize("words, n_words", [("a photo of a", 4), ("a fundus image of", 4)])
def test_coop_cocoop_context_is_the_init_words_tokens(name, words, n_words, demo_root, tmp_path):
    """The first <word count> tokens of the init words are the context; the rest stay fixed text."""
    node = name.upper()
    trainer = build(name, demo_root, tmp_path, f"TRAINER.{node}.N_CTX", "16", f"TRAINER.{node}.CTX_INIT", words)
    ids, learnable = prompt_of(trainer)
    assert ids == expected_ids(trainer, f"{words} Z5.")
    assert learnable == list(range(1, 1 + n_words))
    assert torch.equal(text_learner(trainer).ctx.detach(), embeddings_of(trainer, words)[:n_words])


@pytest.mark.parametrize("n_ctx, text, from_words", [
    (4, "a fundus image Z5.", True),   # "a fund us image" as context, then the class
    (5, "a fundus image of Z5.", True),
    (6, "X X X X X X Z5.", False),     # more tokens than the words have: random, as the original
])
def test_medpromptclip_context_is_the_first_n_ctx_init_tokens(n_ctx, text, from_words, demo_root, tmp_path):
    trainer = build("MedPromptCLIP", demo_root, tmp_path, "TRAINER.MEDPROMPTCLIP.N_CTX", str(n_ctx),
                    "TRAINER.MEDPROMPTCLIP.CTX_INIT", "a fundus image of")
    ids, learnable = prompt_of(trainer)
    assert ids == expected_ids(trainer, text)
    assert learnable == list(range(1, 1 + n_ctx))
    ctx = trainer.prompt_learner.ctx.detach()
    if from_words:
        assert torch.equal(ctx, embeddings_of(trainer, "a fundus image of")[:n_ctx])
    else:
        assert trainer.prompt_learner.ctx_init == "" and ctx.std() < 0.1
