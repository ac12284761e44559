"""Shared fixtures: offline hub, tiny backbones, the demo data, in-process train.py runs."""
import json
import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PROJECT_DIR not in sys.path:
    sys.path.insert(0, PROJECT_DIR)

import torch  # noqa: E402

torch.set_num_threads(2)

import datasets  # noqa: E402,F401
import trainers  # noqa: E402

trainers.register_all()  # registers every trainer and, through them, every catalog dataset

TINY_BACKBONES = ("tiny-clip", "tiny-bert-clip")
# The environment of subprocess sweeps and commands in tests: offline, and on the CPU (no GPU visible),
# so the suite behaves the same on a CUDA machine.
SUBPROCESS_ENV = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")


@pytest.fixture(scope="session")
def backbones():
    from clipkit.backbones import load_backbone

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = load_backbone(name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A data root holding the generated demo dataset (shared; tests must not modify it)."""
    from datasets.catalog import DEMO
    from datasets.demo import generate_demo

    root = tmp_path_factory.mktemp("data")
    generate_demo(os.path.join(root, DEMO.dataset_dir))
    return str(root)


def run_train(*args, capsys=None):
    """Run train.py's main in-process; returns (exit code, stderr text).

    Runs on the CPU unless the arguments set DEVICE, so the suite behaves the same with a GPU present.
    """
    import train

    args = [str(a) for a in args]
    if "DEVICE" not in args:
        args += ["DEVICE", "cpu"]
    code = train.main(args)
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def float_tolerance(reference, ulps=64):
    """An absolute tolerance for comparing float tensors computed in different orders: ``ulps`` units of
    the reference's dtype at the largest magnitude it holds. Summation order differs between CPUs (AVX2,
    AVX-512) and between CPU and GPU kernels; the error scales with the dtype's eps and the values' size."""
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    info = torch.finfo(reference.dtype)
    return ulps * info.eps * max(scale, info.tiny)


def assert_close(actual, reference, ulps=64):
    """``actual`` equals ``reference`` up to float rounding (see float_tolerance)."""
    torch.testing.assert_close(actual, reference, atol=float_tolerance(reference, ulps), rtol=0)


def read_results(output_dir):
    with open(os.path.join(output_dir, "results.json")) as f:
        return json.load(f)


DEMO_CFG = os.path.join(PROJECT_DIR, "configs", "datasets", "demo.yaml")


def recipe(trainer, name):
    return os.path.join(PROJECT_DIR, "configs", "trainers", trainer, f"{name}.yaml")


def pytest_configure(config):
    config.addinivalue_line("markers", "no_accounting: needs a SLURM without accounting (sacct fails); "
                                       ".ci/run runs these after bringing SLURM up with ACCOUNTING=0")
