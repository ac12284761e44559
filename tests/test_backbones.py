"""The backbone factory: tiny models through open_clip, aliases, clear errors for missing weights."""
import time

import pytest
import torch

from conftest import TINY_BACKBONES
from core.errors import UserError
from clipkit.backbones import load_backbone, resolve_spec


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


def test_half_precision_towers_take_float_images():
    from clipkit.prompt_layer import ImageEncoder

    bb = load_backbone("tiny-clip")
    bb.model.half()
    encoder = ImageEncoder(bb.model)
    images = torch.randn(2, 3, *bb.image_size)
    assert encoder(images).dtype == torch.float16
    assert encoder(images, [torch.zeros(2, encoder.width)] * 2).dtype == torch.float16


def test_local_model_folder_with_bert_text_tower(tmp_path):
    """A hub snapshot copied to a folder (BiomedCLIP's offline route): config, weights, BERT files."""
    import json
    import shutil

    from clipkit.backbones import BACKBONE_CONFIG_DIR

    folder = tmp_path / "model"
    folder.mkdir()
    model_cfg = json.load(open(f"{BACKBONE_CONFIG_DIR}/demo-clip.json"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    with pytest.raises(UserError, match="has no weights file"):
        load_backbone(str(folder))
    (folder / "model.pt").write_bytes(b"not a weights file")
    with pytest.raises(UserError, match="cannot read weights file .*model.pt"):
        load_backbone(str(folder))
    (folder / "model.pt").unlink()
    shutil.copy(f"{BACKBONE_CONFIG_DIR}/demo-clip/demo-clip.safetensors", folder / "open_clip_model.safetensors")
    for name in ("config.json", "vocab.txt", "tokenizer_config.json"):
        shutil.copy(f"{BACKBONE_CONFIG_DIR}/demo-bert/{name}", folder / name)
    local, reference = load_backbone(str(folder)), load_backbone("demo-clip")
    assert local.text_kind == "hf"
    for (k, a), (_, b) in zip(local.model.state_dict().items(), reference.model.state_dict().items()):
        assert torch.equal(a, b.to(a.dtype)), k


# ---------------------------------------------------------------- a model folder never runs its own code

def bert_snapshot(tmp_path, marker, tokenizer_kwargs=None, auto_map_config=False):
    """A demo-clip hub snapshot in a folder whose tokenizer (and optionally model config) points at a .py that
    writes a marker when imported."""
    import json
    import shutil

    from clipkit.backbones import BACKBONE_CONFIG_DIR

    folder = tmp_path / "snapshot"
    folder.mkdir()
    model_cfg = json.load(open(f"{BACKBONE_CONFIG_DIR}/demo-clip.json"))
    if tokenizer_kwargs is not None:
        model_cfg["text_cfg"]["tokenizer_kwargs"] = tokenizer_kwargs
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    shutil.copy(f"{BACKBONE_CONFIG_DIR}/demo-clip/demo-clip.safetensors", folder / "open_clip_model.safetensors")
    shutil.copy(f"{BACKBONE_CONFIG_DIR}/demo-bert/vocab.txt", folder / "vocab.txt")
    code = (f"open({str(marker)!r}, 'w').close()\n"
            "from transformers import BertTokenizer, BertConfig, BertModel\n"
            "class MarkerTokenizer(BertTokenizer):\n    pass\n"
            "class MarkerConfig(BertConfig):\n    model_type = 'marker'\n"
            "class MarkerModel(BertModel):\n    config_class = MarkerConfig\n")
    (folder / "marker_code.py").write_text(code)
    tokenizer_config = json.load(open(f"{BACKBONE_CONFIG_DIR}/demo-bert/tokenizer_config.json"))
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["marker_code.MarkerTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    config = json.load(open(f"{BACKBONE_CONFIG_DIR}/demo-bert/config.json"))
    if auto_map_config:
        config["model_type"] = "marker"
        config["auto_map"] = {"AutoConfig": "marker_code.MarkerConfig", "AutoModel": "marker_code.MarkerModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("kwargs, message", [
    ({"trust_remote_code": True}, "sets trust_remote_code, which would run Python code"),
    ({"use_fast": False, "tokenizer_file": "marker_code.py"}, "unknown text_cfg.tokenizer_kwargs entry 'tokenizer_file'"),
])
def test_folder_tokenizer_settings_that_could_run_code_are_refused(tmp_path, kwargs, message):
    marker = tmp_path / "marker"
    folder = bert_snapshot(tmp_path, marker, tokenizer_kwargs=kwargs)
    with pytest.raises(UserError, match=message) as info:
        load_backbone(str(folder))
    assert "\n" not in str(info.value) and not marker.exists()


def test_folder_tokenizer_auto_map_is_ignored(tmp_path):
    """Without trust_remote_code the tokenizer class the folder names (BertTokenizer) is used, not its code."""
    marker = tmp_path / "marker"
    folder = bert_snapshot(tmp_path, marker, tokenizer_kwargs={"strip_sep_token": False})
    backbone = load_backbone(str(folder))
    reference = load_backbone("demo-clip")
    texts = ["a fundus image of glaucoma."]
    assert torch.equal(backbone.tokenizer(texts), reference.tokenizer(texts))
    assert type(backbone.tokenizer.tokenizer).__name__.startswith("BertTokenizer") and not marker.exists()


@pytest.mark.parametrize("where", ["in the folder", "in another folder"])
def test_folder_text_tower_of_its_own_code_is_refused(where, tmp_path):
    import json

    marker = tmp_path / "marker"
    folder = bert_snapshot(tmp_path, marker, auto_map_config=True)
    if where == "in another folder":
        tower = tmp_path / "tower"
        tower.mkdir()
        for name in ("config.json", "marker_code.py"):
            (folder / name).rename(tower / name)
        config = json.loads((folder / "open_clip_config.json").read_text())
        config["model_cfg"]["text_cfg"]["hf_model_name"] = str(tower)
        (folder / "open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="names no built-in Hugging Face architecture \\(model_type 'marker'\\)") as info:
        load_backbone(str(folder))
    assert "\n" not in str(info.value) and not marker.exists()


def test_backbones_are_built_with_remote_code_refused_not_asked_about(tmp_path, monkeypatch):
    """Where transformers would ask on the terminal whether to run a model's own code, building a backbone
    refuses instead (an answer typed in is never read)."""
    from transformers import dynamic_module_utils

    from clipkit.backbones import _remote_code_refused

    asked = []
    monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
    before = dynamic_module_utils.TIME_OUT_REMOTE_CODE
    with _remote_code_refused():
        with pytest.raises(ValueError, match="custom code"):
            dynamic_module_utils.resolve_trust_remote_code(None, str(tmp_path), has_local_code=False,
                                                           has_remote_code=True)
    assert not asked and dynamic_module_utils.TIME_OUT_REMOTE_CODE == before
    assert dynamic_module_utils.resolve_trust_remote_code(None, str(tmp_path), False, True) is True  # outside: asked
    assert asked
