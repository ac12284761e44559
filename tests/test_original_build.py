"""PMC-CLIP as the original code built it: QuickGELU and weights rounded to fp16 (pmc-clip-original)."""
import copy

import pytest
import torch

from clipkit import backbones as bk
from clipkit.prompt_layer import PromptTokenizer


@pytest.fixture
def original_alias(monkeypatch):
    """The original build of the test-sized CLIP, through the same alias mechanism as pmc-clip-original."""
    monkeypatch.setitem(bk.ALIASES, "tiny-clip-original", {"config": "tiny-clip.json", "original_build": True})
    return "tiny-clip-original"


def features(bb):
    torch.manual_seed(1)
    images = torch.rand(2, 3, *bb.image_size)
    ids = PromptTokenizer(bb.tokenizer, bb.context_length)(["a fundus image of glaucoma.", "a CT image of bleeding."])
    with torch.no_grad():
        return bb.model.encode_image(images), bb.model.encode_text(ids)


def reference_original(plain):
    """The reference construction: the same architecture with QuickGELU, the same weights, then open_clip's
    copy of OpenAI's convert_weights (to fp16) and back to fp32."""
    import open_clip
    from open_clip.model import convert_weights_to_lp

    model = open_clip.create_model("tiny-clip", force_quick_gelu=True, pretrained_text=False)
    model.load_state_dict(plain.model.state_dict())
    convert_weights_to_lp(model, dtype=torch.float16)
    model = model.float().eval()
    for p in model.parameters():  # frozen as every backbone is (attention then takes the same kernel)
        p.requires_grad_(False)
    return model


def test_original_build_equals_its_reference_and_differs_from_the_hub_build(original_alias):
    plain = bk.load_backbone("tiny-clip")
    original = bk.load_backbone(original_alias)
    assert original.identity["build"].startswith("original code's: QuickGELU")
    assert original.identity["architecture"]["quick_gelu"] is True and "build" not in plain.identity
    ref = copy.copy(original)
    ref.model = reference_original(plain)
    for got, want in zip(features(original), features(ref)):
        assert torch.equal(got, want)
    # Same initial weights, another activation and rounded weights: other features.
    for a, b in zip(features(original), features(plain)):
        assert not torch.allclose(a, b, atol=1e-4)


def test_rounding_touches_what_convert_weights_touches():
    plain = bk.load_backbone("tiny-clip")
    model = copy.deepcopy(plain.model)
    bk.round_weights_to_half(model)
    before, after = plain.model.state_dict(), model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.endswith("attn.in_proj_weight") for k in changed) and "text_projection" in changed
    assert not any("ln_" in k or k.endswith("token_embedding.weight") or k == "logit_scale" for k in changed)
    for k in changed:
        assert torch.equal(after[k], before[k].half().float())


def test_pmc_clip_original_takes_the_original_weights_file(tmp_path):
    weights = tmp_path / "pmc_vit_l_14_weights.pt"
    weights.write_bytes(b"")
    spec = bk.resolve_spec("pmc-clip-original", str(weights))
    assert spec == {"file": str(weights), "arch": "ViT-L-14-quickgelu", "original_build": True}
    assert bk.resolve_spec("pmc-clip", str(weights))["arch"] == "ViT-L-14"
