"""Backbones from weights files as users have them: OpenAI-format state dicts and TorchScript archives."""
import hashlib
import json
import os
import shutil

import pytest
import torch

from conftest import DEMO_CFG, read_results, recipe, run_train
from core.errors import UserError
from clipkit import backbones as _backbones
from clipkit.backbones import load_backbone

# OpenAI's layout at test size: one attention head per 64 channels, QuickGELU, CLIP's BPE vocabulary.
TINY_OPENAI_CFG = {
    "embed_dim": 32, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


@pytest.fixture(scope="module")
def openai_files(tmp_path_factory):
    """A tiny CLIP saved as a plain state dict and as a TorchScript archive, with the model itself."""
    import warnings

    from open_clip.model import CLIP

    folder = tmp_path_factory.mktemp("openai")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = CLIP(**TINY_OPENAI_CFG).eval()
    # Frozen like every backbone, so that both take the same attention kernels.
    model.requires_grad_(False)
    torch.save(model.state_dict(), folder / "state_dict.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        torch.jit.save(torch.jit.script(model), str(folder / "torchscript.pt"))
    return model, folder


def features(model, tokenizer):
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    ids = tokenizer(["a fundus image of glaucoma.", "a chest x-ray of pneumonia."])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(ids)


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_openai_format_file_gives_the_models_own_features(kind, openai_files):
    model, folder = openai_files
    path = str(folder / f"{kind}.pt")
    backbone = load_backbone(path)
    assert backbone.text_kind == "native" and backbone.image_size == (32, 32) and backbone.context_length == 77
    image, text = features(backbone.model, backbone.tokenizer)
    ref_image, ref_text = features(model, backbone.tokenizer)
    assert torch.equal(image, ref_image) and torch.equal(text, ref_text)
    identity = backbone.identity
    assert identity["weights"] == path and identity["weights_sha256"] == sha256(path)
    assert identity["weights_format"] == kind
    assert identity["architecture"] == TINY_OPENAI_CFG
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_half_precision_state_dict_with_openai_extras(openai_files, tmp_path):
    """OpenAI's files keep most weights in float16 and model facts (input_resolution, ...) as tensors."""
    from open_clip.model import CLIP

    model, _ = openai_files
    state = {k: v.half() for k, v in model.state_dict().items()}
    state.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    torch.save(state, tmp_path / "fp16.pt")
    reference = CLIP(**TINY_OPENAI_CFG).eval().requires_grad_(False)
    reference.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    backbone = load_backbone(str(tmp_path / "fp16.pt"))
    assert backbone.identity["architecture"] == TINY_OPENAI_CFG
    assert all(p.dtype == torch.float32 for p in backbone.model.parameters())
    image, text = features(backbone.model, backbone.tokenizer)
    ref_image, ref_text = features(reference, backbone.tokenizer)
    assert torch.equal(image, ref_image) and torch.equal(text, ref_text)


def test_model_folder_with_a_pt_file(openai_files, tmp_path):
    model, folder = openai_files
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(folder / "torchscript.pt", alone / "pmc_vit_l_14_weights.pt")
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shutil.copy(folder / "state_dict.pt", snapshot / "pmc_vit_l_14_weights.pt")
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPENAI_CFG, "preprocess_cfg": {}}))
    for path in (alone, snapshot):
        backbone = load_backbone(str(path))
        assert backbone.identity["weights"] == str(path / "pmc_vit_l_14_weights.pt")
        image, text = features(backbone.model, backbone.tokenizer)
        ref_image, ref_text = features(model, backbone.tokenizer)
        assert torch.equal(image, ref_image) and torch.equal(text, ref_text)
    shutil.copy(folder / "state_dict.pt", alone / "second.pt")
    with pytest.raises(UserError, match="several weights files"):
        load_backbone(str(alone))


def test_architecture_name_or_alias_with_a_torchscript_file(openai_files, tmp_path, monkeypatch):
    import open_clip

    model, folder = openai_files
    config = tmp_path / "tiny-openai-test.json"
    config.write_text(json.dumps(TINY_OPENAI_CFG))
    open_clip.add_model_config(str(config))
    path = str(folder / "torchscript.pt")
    # An alias whose hub model can also be given as a weights file, like pmc-clip.
    monkeypatch.setitem(_backbones.ALIASES, "tiny-hub", {"hub": "hf-hub:nobody/tiny", "file_arch": "tiny-openai-test"})
    for name in ("tiny-openai-test", "tiny-hub"):
        backbone = load_backbone(name, pretrained=path)
        assert backbone.identity["weights_sha256"] == sha256(path)
        image, text = features(backbone.model, backbone.tokenizer)
        ref_image, ref_text = features(model, backbone.tokenizer)
        assert torch.equal(image, ref_image) and torch.equal(text, ref_text)


def test_pmc_clip_with_a_file_of_another_architecture_fails_before_building(openai_files):
    _, folder = openai_files
    with pytest.raises(UserError, match=r"not pmc-clip's architecture \(ViT-L-14\): .*vision layers 2 \(expected 24\)"):
        load_backbone("pmc-clip", pretrained=str(folder / "state_dict.pt"))
    with pytest.raises(UserError, match="PRETRAINED .*not found"):
        load_backbone("pmc-clip", pretrained=str(folder / "missing.pt"))


@pytest.mark.parametrize("content, message", [
    (b"not a weights file", "cannot read weights file"),
    ("module", "holds pickled Python objects"),
    ({"a": torch.zeros(2)}, "not an OpenAI-format CLIP state dict"),
    ({"state_dict": {"a": 1}}, "entry 'a' is not a tensor"),
])
def test_bad_weights_file_is_one_clear_error(content, message, tmp_path):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(torch.nn.Linear(2, 2) if content == "module" else content, path)
    with pytest.raises(UserError, match=message) as info:
        load_backbone(str(path))
    assert "\n" not in str(info.value)


def test_truncated_weights_file(openai_files, tmp_path):
    _, folder = openai_files
    for name in ("state_dict.pt", "torchscript.pt"):
        data = (folder / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(UserError, match="cannot read weights file"):
            load_backbone(str(tmp_path / name))


def test_results_record_the_weights_file(openai_files, demo_root, tmp_path, capsys):
    _, folder = openai_files
    path = str(folder / "torchscript.pt")
    out = tmp_path / "zs"
    code, err = run_train("--root", demo_root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", out, "--eval-only",
                          "--backbone", path, "DEVICE", "cpu", capsys=capsys)
    assert code == 0, err
    identity = read_results(out)["backbone_identity"]
    assert identity["weights_sha256"] == sha256(path) and identity["architecture"] == TINY_OPENAI_CFG
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    code, err = run_train("--root", demo_root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", tmp_path / "bad",
                          "--eval-only", "--backbone", bad, "DEVICE", "cpu", capsys=capsys)
    assert code == 2 and err.startswith("error: cannot read weights file") and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "bad" / "results.json")
