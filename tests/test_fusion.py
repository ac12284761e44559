"""Test-time fusion of learned prompts with the description ensemble (TEST.FUSE_DESCRIPTIONS)."""
import pytest
import torch

from conftest import DEMO_CFG, read_results, recipe, run_train

FAST = ["OPTIM.MAX_EPOCH", "4", "OPTIM.WARMUP_EPOCH", "1", "DATALOADER.TRAIN_X.BATCH_SIZE", "48"]
SAME = ("accuracy", "macro_f1", "kappa", "auc", "specificity", "ece", "confusion_matrix")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_root):
    out = str(tmp_path_factory.mktemp("fusion") / "base")
    code, err = run_train("--root", demo_root, "--trainer", "MedPromptCLIP", "--dataset-config-file", DEMO_CFG,
                          "--config-file", recipe("MedPromptCLIP", "demo"), "--output-dir", out, "--seed", "1",
                          "MODEL.BACKBONE.NAME", "tiny-clip", *FAST, "DATASET.SUBSAMPLE_CLASSES", "base",
                          "TEST.NO_TEST", "True")
    assert code == 0, err
    return out


def evaluate_new(demo_root, out, trainer, config, *opts, model_dir=None):
    args = ["--root", demo_root, "--trainer", trainer, "--dataset-config-file", DEMO_CFG, "--config-file", config,
            "--output-dir", out, "--eval-only", *(["--model-dir", model_dir] if model_dir else []),
            "MODEL.BACKBONE.NAME", "tiny-clip", "DATASET.SUBSAMPLE_CLASSES", "new", *opts]
    code, err = run_train(*args)
    assert code == 0, err
    return read_results(out)


def test_weight_0_is_the_learned_prompts_and_weight_1_the_description_ensemble(tmp_path, demo_root, trained):
    mp = recipe("MedPromptCLIP", "demo")
    plain = evaluate_new(demo_root, str(tmp_path / "plain"), "MedPromptCLIP", mp, model_dir=trained)
    w0 = evaluate_new(demo_root, str(tmp_path / "w0"), "MedPromptCLIP", mp, "TEST.FUSE_DESCRIPTIONS", "0",
                      model_dir=trained)
    w1 = evaluate_new(demo_root, str(tmp_path / "w1"), "MedPromptCLIP", mp, "TEST.FUSE_DESCRIPTIONS", "1",
                      model_dir=trained)
    half = evaluate_new(demo_root, str(tmp_path / "half"), "MedPromptCLIP", mp, "TEST.FUSE_DESCRIPTIONS", "0.5",
                        model_dir=trained)
    zs = evaluate_new(demo_root, str(tmp_path / "zs"), "ZeroShotCLIP", recipe("ZeroShotCLIP", "descriptions"))
    assert all(w0[k] == plain[k] for k in SAME) and w0["method"] == "MedPromptCLIP"
    assert all(w1[k] == zs[k] for k in SAME), {k: (w1[k], zs[k]) for k in SAME if w1[k] != zs[k]}
    assert w1["method"] == "MedPromptCLIP + descriptions 1" and half["method"] == "MedPromptCLIP + descriptions 0.5"
    assert half["fuse_descriptions"]["weight"] == 0.5
    assert half["fuse_descriptions"]["description_files"][0]["path"].endswith("demo.json")
    # The untrained prompts and the descriptions disagree on some image, so a mix is neither.
    assert plain["confusion_matrix"] != zs["confusion_matrix"]


@pytest.mark.parametrize("trainer", ["MaPLe", "CoCoOp"])
def test_fusion_of_image_trained_prompts(tmp_path, demo_root, trainer):
    """The stacked trainers: their class features at weight 0 and 1, and training untouched by the setting."""
    import train
    from core.engine import TRAINER_REGISTRY
    from trainers.zsclip import mean_features
    from clipkit.descriptions import load_descriptions

    def build(weight):
        args = train.build_parser().parse_args([
            "--root", demo_root, "--trainer", trainer, "--dataset-config-file", DEMO_CFG,
            "--config-file", recipe(trainer, "base2new"), "--output-dir", str(tmp_path / f"w{weight}"), "--seed", "1",
            "MODEL.BACKBONE.NAME", "tiny-clip", "DEVICE", "cpu", "DATASET.NUM_SHOTS", "1",
            "TEST.FUSE_DESCRIPTIONS", str(weight)])
        return TRAINER_REGISTRY.get(trainer)(train.setup_cfg(args))

    t0, t1 = build(0), build(1)
    images = next(iter(t0.test_loader))["img"][:3]
    t1.prompt_learner.load_state_dict(t0.prompt_learner.state_dict())
    for t in (t0, t1):
        t.set_model_mode("eval")
    with torch.no_grad():
        ensemble = mean_features(t1.encode_texts([x for g in load_descriptions("demo", t1.classnames) for x in g]),
                                 load_descriptions("demo", t1.classnames))
        assert torch.equal(t1.description_ensemble(), ensemble)
        if trainer == "MaPLe":
            learned = t0.class_text_features()
            assert torch.equal(t0.fuse(learned), learned)
            assert torch.equal(t1.fuse(learned), ensemble)
            image = t1.normalized_image_features(images, t1.vision_prompts())
            assert torch.equal(t1.model_inference(images), t1.logit_scale * image @ ensemble.t())
        else:
            image = t1.normalized_image_features(images)
            expected = t1.logit_scale * image @ ensemble.t()
            assert torch.allclose(t1.model_inference(images), expected, atol=1e-5 * t1.logit_scale)
        assert not torch.allclose(t0.model_inference(images), t1.model_inference(images), atol=1e-3)
    # A training step is the same whatever the weight: fusion is for test time only.
    batch = next(iter(t0.train_loader_x))
    for t in (t0, t1):
        t.set_model_mode("train")
        t.batch_idx, t.num_batches = 0, 2
    torch.manual_seed(0)
    l0 = t0.forward_backward(batch)["loss"]
    torch.manual_seed(0)
    l1 = t1.forward_backward(batch)["loss"]
    assert l0 == l1
