"""The backbone factory: tiny models through open_clip, aliases, clear errors for missing weights."""
import time

import pytest
import torch

from conftest import TINY_BACKBONES
from core.errors import UserError
from trainers._backbones import load_backbone, resolve_spec


@pytest.mark.parametrize("name", TINY_BACKBONES)
def test_tiny_backbones_are_the_same_every_time(name):
    a, b = load_backbone(name), load_backbone(name)
    assert a.text_kind == ("hf" if "bert" in name else "native")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    assert not any(p.requires_grad for p in a.model.parameters())
    assert a.image_size == (32, 32) and len(a.mean) == 3


def test_aliases_resolve():
    assert resolve_spec("biomedclip") == {"hub": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"}
    assert resolve_spec("PMC-CLIP")["hub"] == "hf-hub:ryanyip7777/pmc_vit_l_14"
    assert resolve_spec("ViT-B/16") == {"arch": "ViT-B-16-quickgelu", "pretrained": "openai"}
    assert resolve_spec("ViT-B-32", "laion2b_s34b_b79k") == {"arch": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}


@pytest.mark.parametrize("name, message", [
    ("pmc-clip", "open_clip_config.json"),
    ("biomedclip", "huggingface.co/microsoft/BiomedCLIP"),
    ("ViT-L/14", "MODEL.BACKBONE.PRETRAINED <path to the file>"),
    ("ViT-B-32", "needs weights"),
    ("not-a-model", "unknown backbone"),
    ("/no/such/folder", "not found"),
])
def test_missing_weights_fail_fast_with_instructions(name, message):
    start = time.time()
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_backbone(name)
    assert time.time() - start < 10


def test_local_folder_needs_open_clip_config(tmp_path):
    with pytest.raises(UserError, match="no open_clip_config.json"):
        load_backbone(str(tmp_path))
