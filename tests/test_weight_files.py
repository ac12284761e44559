"""Backbones from weights files as users have them: OpenAI-format state dicts and TorchScript archives."""
import hashlib
import json
import os
import shutil
import warnings
from typing import Tuple

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


# ---------------------------------------------------------------- TorchScript archives are read as data

class MarkerOnLoad(torch.nn.Module):
    """A TorchScript module whose ``__setstate__``, run by torch.jit.load, writes a marker file."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = marker
        self.weight = torch.nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return x + self.weight

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.marker, self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.marker = state[0]
        self.weight = state[1]
        written = torch.from_file(self.marker, True, 1, dtype=torch.uint8)
        written.fill_(88)
        self.training = bool(written[0] == 88) and state[2]


def jit_save(module, path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notices
        torch.jit.save(module, str(path))


def jit_state_dict(path):
    """What torch.jit.load gives (run here only on archives these tests built)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu").state_dict()


@pytest.fixture(scope="module")
def marker_archive(tmp_path_factory):
    folder = tmp_path_factory.mktemp("payload")
    marker = folder / "marker"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation notice
        jit_save(torch.jit.script(MarkerOnLoad(str(marker))), folder / "payload.pt")
    return folder / "payload.pt", marker


def test_the_payload_archive_writes_its_marker_when_torch_jit_loads_it(marker_archive):
    """The payload below is real: torch.jit.load runs its code (this is what the reader never does)."""
    path, marker = marker_archive
    jit_state_dict(path)
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("route", ["name", "pretrained", "folder", "snapshot-pt", "snapshot-bin"])
def test_torchscript_payload_runs_no_code(route, marker_archive, tmp_path):
    import open_clip

    path, marker = marker_archive
    assert not marker.exists()
    snapshot = {"model_cfg": TINY_OPENAI_CFG, "preprocess_cfg": {}}
    if route == "name":
        call = (str(path),)
    elif route == "pretrained":
        config = tmp_path / "tiny-openai-payload.json"
        config.write_text(json.dumps(TINY_OPENAI_CFG))
        open_clip.add_model_config(str(config))
        call = ("tiny-openai-payload", str(path))
    else:
        folder = tmp_path / route
        folder.mkdir()
        name = {"folder": "weights.pt", "snapshot-pt": "weights.pt", "snapshot-bin": "open_clip_pytorch_model.bin"}
        shutil.copy(path, folder / name[route])
        if route != "folder":
            (folder / "open_clip_config.json").write_text(json.dumps(snapshot))
        call = (str(folder),)
    with pytest.raises(UserError, match=r"TorchScript file .* is not read: .*custom state.*torch\.save") as info:
        load_backbone(*call)
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_torchscript_payload_as_backbone_of_a_run_is_one_line(marker_archive, demo_root, tmp_path, capsys):
    path, marker = marker_archive
    code, err = run_train("--root", demo_root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", tmp_path / "zs",
                          "--eval-only", "--backbone", path, "DEVICE", "cpu", capsys=capsys)
    assert code == 2 and err.startswith("error: TorchScript file") and err.count("\n") == 1, err
    assert not marker.exists() and not (tmp_path / "zs" / "results.json").exists()


def rewrite_data_pkl(source, target, data):
    """A copy of a TorchScript archive with another data.pkl."""
    import zipfile

    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, data if info.filename.endswith("/data.pkl") else src.read(info.filename))


class _Call:
    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("function", [os.system, exec])
def test_forbidden_global_in_a_torchscript_pickle_is_refused(function, openai_files, tmp_path):
    import pickle

    _, folder = openai_files
    marker = tmp_path / "marker"
    command = f"touch {marker}" if function is os.system else f"open({str(marker)!r}, 'w').close()"
    path = tmp_path / "crafted.pt"
    rewrite_data_pkl(folder / "torchscript.pt", path, pickle.dumps(_Call(function, command), protocol=2))
    name = "posix.system" if function is os.system else "(__builtin__|builtins).exec"  # protocol 2 spells it __builtin__
    with pytest.raises(UserError, match=rf"TorchScript file .* is not read: its pickled state names {name}") as info:
        load_backbone(str(path))
    assert "\n" not in str(info.value) and not marker.exists()


def test_torchscript_reader_gives_what_torch_jit_load_gives(openai_files, tmp_path):
    """Scripted and traced archives, float32 and float16, ViT and ResNet towers: the same entries, bit for bit."""
    from open_clip.model import CLIP

    from clipkit.weight_files import read_state_dict

    model, folder = openai_files
    resnet_cfg = {**TINY_OPENAI_CFG, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        resnet = CLIP(**resnet_cfg).eval()
    # OpenAI's files are traced (encode_image and encode_text as methods) and keep weights in float16.
    jit_save(trace_clip(copy_half(model)), tmp_path / "traced_fp16.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        jit_save(torch.jit.script(resnet), tmp_path / "resnet.pt")
    for path in (folder / "torchscript.pt", tmp_path / "traced_fp16.pt", tmp_path / "resnet.pt"):
        expected = jit_state_dict(path)
        state_dict, kind = read_state_dict(str(path))
        assert kind == "torchscript" and list(state_dict) == list(expected)
        for key, value in expected.items():
            assert state_dict[key].dtype == value.dtype and torch.equal(state_dict[key], value), key
    assert state_dict["visual.layer1.0.bn1.num_batches_tracked"].dtype == torch.int64


def copy_half(model):
    import copy

    return copy.deepcopy(model).half()


def trace_clip(model):
    """A CLIP traced as OpenAI's released files are: encode_image and encode_text as methods."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation notices
        return torch.jit.trace_module(model, {"encode_image": torch.randn(1, 3, 32, 32).half(),
                                              "encode_text": torch.zeros(1, 77, dtype=torch.long)})


def test_traced_half_precision_torchscript_clip_gives_the_state_dict_features(openai_files, tmp_path):
    model, folder = openai_files
    half = copy_half(model)
    jit_save(trace_clip(half), tmp_path / "traced.pt")
    torch.save(half.state_dict(), tmp_path / "state_dict.pt")
    from_archive, from_state_dict = load_backbone(str(tmp_path / "traced.pt")), load_backbone(str(tmp_path / "state_dict.pt"))
    assert from_archive.identity["weights_format"] == "torchscript"
    image, text = features(from_archive.model, from_archive.tokenizer)
    ref_image, ref_text = features(from_state_dict.model, from_state_dict.tokenizer)
    assert torch.equal(image, ref_image) and torch.equal(text, ref_text)


def test_open_clip_snapshot_whose_weights_are_torchscript_loads_as_data(openai_files, tmp_path):
    model, folder = openai_files
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shutil.copy(folder / "torchscript.pt", snapshot / "open_clip_pytorch_model.bin")
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPENAI_CFG, "preprocess_cfg": {}}))
    backbone = load_backbone(str(snapshot))
    assert backbone.identity["weights_format"] == "torchscript"
    image, text = features(backbone.model, backbone.tokenizer)
    ref_image, ref_text = features(model, backbone.tokenizer)
    assert torch.equal(image, ref_image) and torch.equal(text, ref_text)
