"""demo-clip: the committed pretrained weights beat chance on the demo, and the pretraining script runs."""
import importlib.util
import os
import random

import torch
from safetensors.torch import load_file

from conftest import DEMO_CFG, PROJECT_DIR, read_results, recipe, run_train
from datasets.catalog import DEMO, readable_classname
from datasets.demo import CLASS_LOOKS, SPLIT_SIZES
from clipkit.backbones import load_backbone
from clipkit.descriptions import load_descriptions

SCRIPT = os.path.join(PROJECT_DIR, "scripts", "pretrain_demo_backbone.py")
_spec = importlib.util.spec_from_file_location("pretrain_demo_backbone", SCRIPT)
pretrain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain)


def test_demo_clip_zero_shot_beats_chance(tmp_path, demo_root, capsys):
    out = str(tmp_path / "zs")
    code, err = run_train("--root", demo_root, "--trainer", "ZeroShotCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("ZeroShotCLIP", "template"), "--output-dir", out, "--eval-only",
                          "MODEL.BACKBONE.NAME", "demo-clip", capsys=capsys)
    assert code == 0, err
    results = read_results(out)
    chance = 100.0 / DEMO.num_classes
    assert results["num_samples"] == DEMO.num_classes * SPLIT_SIZES["test"]
    assert results["accuracy"] >= 2 * chance, results["accuracy"]


def test_captions_name_the_class_only_sometimes_in_known_words():
    rng = random.Random(0)
    for classname, (style, finding) in CLASS_LOOKS.items():
        captions = [pretrain.make_caption(rng, style, finding, classname) for _ in range(1000)]
        named = sum(readable_classname(classname) in caption for caption in captions) / len(captions)
        # Descriptive names turn up often; code names rarely, so only descriptions say what a code shows.
        low, high = (0.01, 0.06) if pretrain.is_code_name(classname) else (0.2, 0.4)
        assert low < named < high, (classname, named)
    captions = [pretrain.draw_pair(rng, 0, n)[1] for n in range(2000)]
    descriptions = [d for texts in load_descriptions(DEMO.name, DEMO.classnames, "llm_descriptions") for d in texts]
    tokenizer = load_backbone("demo-clip").tokenizer.tokenizer
    assert not [t for t in captions + descriptions if tokenizer.unk_token in tokenizer.tokenize(t)]
    # Descriptions of a code-named class describe the image, never give the code.
    for classname, texts in zip(DEMO.classnames, load_descriptions(DEMO.name, DEMO.classnames, "llm_descriptions")):
        if pretrain.is_code_name(classname):
            assert not any(classname.lower() in t.lower() for t in texts), classname


def test_pretraining_writes_loadable_deterministic_weights(tmp_path, capsys):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for path in (a, b):
        assert pretrain.main(["--steps", "2", "--batch-size", "8", "--seed", "3", "--out", str(path)]) == 0
    assert "wrote" in capsys.readouterr().out
    weights_a, weights_b = load_file(str(a)), load_file(str(b))
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    # Written through a temporary file that is renamed into place: nothing else is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "b.safetensors"]

    # A user-given weights file replaces the committed one, through the same factory.
    state = load_backbone("demo-clip", pretrained=str(a)).model.state_dict()
    assert all(torch.equal(state[k].to(weights_a[k].dtype), weights_a[k]) for k in weights_a)
