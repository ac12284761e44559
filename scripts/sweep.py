"""Sweeps behind scripts/*.sh: methods x datasets x seeds (x shots), skipping finished runs.

    python scripts/sweep.py base2new TARGET
    python scripts/sweep.py fewshot TARGET
    python scripts/sweep.py crossmodal TARGET [POOL]
    python scripts/sweep.py zeroshot TARGET

TARGET is a dataset, a modality group (fundus, oct, pathology, xray, ..., eye, all) or demo,
or a dataset declared in data (DATA/<name>/dataset.yaml, written by python -m datasets.make_split --folder).
Settings come from environment variables (defaults in brackets):
  DATA      data root                                         [./data]
  OUTPUT    output root                                       [./output]
  BACKBONE  MODEL.BACKBONE.NAME                               [demo-clip for demo, else pmc-clip]
  METHODS   methods for base2new                              [MedPromptCLIP CoOp MaPLe]
  SEEDS     seeds                                             [1 2 3]
  SHOTS     shots for fewshot (and for image-based base2new)  [1 2 4 8 16] / [16]
  OPTS      extra KEY VALUE overrides for every run           []
A run whose results.json exists is skipped, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import time

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)
sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))

from core.errors import UserError  # noqa: E402

TEXT_ONLY = {"MedPromptCLIP", "ZeroShotCLIP"}
# The method of the few-shot rows started from MedPromptCLIP prompts: the paper's few-shot setting.
STACKED = "IVLP"
MIN_CLASSES_BASE2NEW = 4


class Settings:
    def __init__(self, target):
        env = os.environ
        self.target = target
        self.data = env.get("DATA", os.path.join(PROJECT_DIR, "data"))
        self.output = env.get("OUTPUT", os.path.join(PROJECT_DIR, "output"))
        self.backbone = env.get("BACKBONE") or ("demo-clip" if target == "demo" else "pmc-clip")
        self.methods = env.get("METHODS", "MedPromptCLIP CoOp MaPLe").split()
        self.seeds = [int(s) for s in env.get("SEEDS", "1 2 3").split()]
        self.shots = [int(s) for s in env.get("SHOTS", "1 2 4 8 16").split()]
        self.base2new_shots = int(env.get("SHOTS", "16").split()[-1])
        self.opts = env.get("OPTS", "").split()


def datasets_of(target):
    from datasets.catalog import resolve_target

    try:
        return resolve_target(target)
    except KeyError as e:
        raise UserError(e.args[0]) from None


def preflight(settings, names):
    """Stop before training anything if a dataset folder or the backbone's weights are missing."""
    from datasets.catalog import get_entry
    from datasets.split_files import image_folder, image_presence, load_split_file, locate_split
    from trainers._backbones import check_backbone
    from trainers._descriptions import descriptions_path

    problems = []
    for name in names:
        entry = get_entry(name)
        split_path, kind = locate_split(settings.data, entry)
        images = os.path.join(image_folder(settings.data, entry), "")
        if entry.generated:
            continue
        if split_path is None:
            option = f"--folder {name}" if entry.declared_in else f"--dataset {name}"
            problems.append(
                f"dataset {name}: no split; sort its images into {os.path.join(images, '<class>', '')} and run "
                f"python -m datasets.make_split --root {settings.data} {option}"
            )
            continue
        found, listed, first_missing = image_presence(settings.data, entry, load_split_file(split_path)[0])
        if found < listed:
            problems.append(
                f"dataset {name}: {found}/{listed} images of the {'shipped' if kind == 'shipped' else 'dataset'} split "
                f"found under {images} (first missing: {first_missing})"
            )
        if entry.declared_in and "MedPromptCLIP" in settings.methods and not os.path.isfile(descriptions_path(name)):
            problems.append(
                f"dataset {name}: no descriptions file {descriptions_path(name)} for MedPromptCLIP; name one in "
                f"{entry.declared_in} or generate it: python scripts/generate_descriptions.py {name} --root {settings.data}"
            )
    try:
        check_backbone(settings.backbone)
    except UserError as e:
        problems.append(str(e))
    if problems:
        raise UserError(
            f"cannot run {settings.target} (data root DATA={settings.data}, backbone BACKBONE={settings.backbone}); "
            f"nothing was started:\n" + "\n".join(f"  - {p}" for p in problems)
        )


class Runner:
    """Runs train.py in this process, one line of progress per run."""

    def __init__(self, settings, total):
        self.settings = settings
        self.total = total
        self.done = 0

    def __call__(self, label, out, args):
        import train

        self.done += 1
        prefix = f"[{self.done}/{self.total}] {label}"
        results = os.path.join(out, "results.json")
        if os.path.isfile(results):
            print(f"{prefix}: done before, skipped", flush=True)
            return
        start = time.time()
        # Options first: everything after the first KEY VALUE pair is read as overrides.
        argv = ["--output-dir", out, "--feature-cache", os.path.join(self.settings.output, "feature_cache"), *args,
                "MODEL.BACKBONE.NAME", self.settings.backbone, *self.settings.opts]
        with contextlib.redirect_stdout(io.StringIO()):
            code = train.main(argv)
        if code != 0:
            raise UserError(f"run failed ({label}); its log is {os.path.join(out, 'log.txt')}")
        print(f"{prefix}: {time.time() - start:.0f}s", flush=True)


def dataset_config(dataset):
    from datasets.declared import dataset_config_file

    return dataset_config_file(dataset)


def common(settings, dataset, trainer, recipe, seed, shots=None):
    """Arguments every run shares; ``recipe`` is a protocol or recipe name (trainers/recipes.py picks the file)."""
    from trainers.recipes import recipe_file

    return [
        "--root", settings.data, "--trainer", trainer, "--seed", str(seed),
        "--dataset-config-file", dataset_config(dataset),
        "--config-file", recipe_file(trainer, recipe, dataset, shots),
    ]


def base2new(settings):
    from datasets.catalog import get_entry

    names = datasets_of(settings.target)
    kept = [n for n in names if get_entry(n).num_classes >= MIN_CLASSES_BASE2NEW]
    for n in names:
        if n not in kept:
            print(f"skipped {n}: {get_entry(n).num_classes} classes, base-to-new needs at least {MIN_CLASSES_BASE2NEW}")
    if not kept:
        raise UserError(f"no dataset in {settings.target} has {MIN_CLASSES_BASE2NEW} or more classes")
    preflight(settings, kept)
    root = os.path.join(settings.output, "base2new", settings.backbone.replace("/", "-"))
    run = Runner(settings, 2 * len(kept) * len(settings.methods) * len(settings.seeds))
    for dataset in kept:
        for method in settings.methods:
            recipe = "base2new"
            for seed in settings.seeds:
                base_dir = os.path.join(root, dataset, method, f"seed{seed}", "base")
                new_dir = os.path.join(root, dataset, method, f"seed{seed}", "new")
                args = common(settings, dataset, method, recipe, seed)
                shots = [] if method in TEXT_ONLY else ["DATASET.NUM_SHOTS", str(settings.base2new_shots)]
                if method == "ZeroShotCLIP":
                    run(f"{method} {dataset} seed {seed} base", base_dir,
                        [*args, "--eval-only", "DATASET.SUBSAMPLE_CLASSES", "base"])
                    run(f"{method} {dataset} seed {seed} new", new_dir,
                        [*args, "--eval-only", "DATASET.SUBSAMPLE_CLASSES", "new"])
                    continue
                run(f"{method} {dataset} seed {seed} train base", base_dir,
                    [*args, *shots, "DATASET.SUBSAMPLE_CLASSES", "base"])
                run(f"{method} {dataset} seed {seed} test new", new_dir,
                    [*args, "--eval-only", "--model-dir", base_dir, "DATASET.SUBSAMPLE_CLASSES", "new"])
    import aggregate

    aggregate.report("base2new", root)


def medprompt_run(settings, run, root, dataset, seed):
    """A MedPromptCLIP specific-modal run (all classes): the 0-shot line and the prompts that stacking starts from."""
    out = os.path.join(root, dataset, "MedPromptCLIP", "shots0", f"seed{seed}")
    run(f"MedPromptCLIP {dataset} seed {seed}", out,
        common(settings, dataset, "MedPromptCLIP", "fewshot", seed))
    return out


def stacking_overrides(settings, dataset):
    """Overrides giving the MedPromptCLIP run the stacked recipe's text prompt shape ([] if it has it)."""
    from trainers.recipes import recipe_file, resolve, source_overrides

    ds = dataset_config(dataset)
    source = resolve("MedPromptCLIP", recipe_file("MedPromptCLIP", "fewshot", dataset), ds, settings.opts)
    target = resolve(STACKED, recipe_file(STACKED, "stacked", dataset), ds, settings.opts)
    return source_overrides(source, STACKED, target)


def fewshot(settings):
    names = datasets_of(settings.target)
    preflight(settings, names)
    root = os.path.join(settings.output, "fewshot", settings.backbone.replace("/", "-"))
    methods = ["CoOp", "MaPLe"]
    reshape = {dataset: stacking_overrides(settings, dataset) for dataset in names}
    per_dataset = len(settings.seeds) * (2 + (len(methods) + 1) * len(settings.shots))
    run = Runner(settings, len(names) * per_dataset + len(settings.seeds) * sum(1 for d in names if reshape[d]))
    for dataset in names:
        for seed in settings.seeds:
            run(f"ZeroShotCLIP {dataset} seed {seed}", os.path.join(root, dataset, "ZeroShotCLIP", "shots0", f"seed{seed}"),
                [*common(settings, dataset, "ZeroShotCLIP", "template", seed), "--eval-only"])
            source = medprompt_run(settings, run, root, dataset, seed)
            if reshape[dataset]:
                # The 0-shot run's prompts do not fit the stacked recipe: the rows start from a MedPromptCLIP
                # run of the same recipe with the stacked recipe's text context (not evaluated, not a row).
                source = os.path.join(root, dataset, "MedPromptCLIP-source", f"seed{seed}")
                run(f"MedPromptCLIP {dataset} seed {seed} ({' '.join(reshape[dataset])})", source,
                    [*common(settings, dataset, "MedPromptCLIP", "fewshot", seed), "TEST.NO_TEST", "True",
                     *reshape[dataset]])
            for method in methods:
                for shots in settings.shots:
                    args = [*common(settings, dataset, method, "fewshot", seed, shots), "DATASET.NUM_SHOTS", str(shots)]
                    run(f"{method} {dataset} {shots}-shot seed {seed}",
                        os.path.join(root, dataset, method, f"shots{shots}", f"seed{seed}"), args)
            for shots in settings.shots:
                stacked = [*common(settings, dataset, STACKED, "stacked", seed), "--init-from", source,
                           "DATASET.NUM_SHOTS", str(shots)]
                run(f"{STACKED}+MedPromptCLIP {dataset} {shots}-shot seed {seed}",
                    os.path.join(root, dataset, f"{STACKED}+MedPromptCLIP", f"shots{shots}", f"seed{seed}"), stacked)
    import aggregate

    aggregate.report("fewshot", root)


def crossmodal(settings, pool):
    names = datasets_of(settings.target)
    datasets_of(pool)  # an unknown pool is an error before anything runs
    preflight(settings, names)
    root = os.path.join(settings.output, "crossmodal", settings.backbone.replace("/", "-"), f"pool-{pool}")
    run = Runner(settings, len(settings.seeds) * (1 + 3 * len(names)))
    for seed in settings.seeds:
        source = os.path.join(root, "train", f"seed{seed}")
        # Training reads no image: the first target dataset only gives the run a dataset to name.
        run(f"MedPromptCLIP pool {pool} seed {seed}", source,
            [*common(settings, names[0], "MedPromptCLIP", "multi_modal", seed), "TEST.NO_TEST", "True",
             "TRAINER.MEDPROMPTCLIP.DESCRIPTION_SOURCES", f"['{pool}']"])
        for dataset in names:
            zs = os.path.join(root, dataset, "ZeroShotCLIP-template", f"seed{seed}")
            run(f"ZeroShotCLIP template {dataset} seed {seed}", zs,
                [*common(settings, dataset, "ZeroShotCLIP", "template", seed), "--eval-only"])
            ds = os.path.join(root, dataset, "ZeroShotCLIP-descriptions", f"seed{seed}")
            run(f"ZeroShotCLIP descriptions {dataset} seed {seed}", ds,
                [*common(settings, dataset, "ZeroShotCLIP", "descriptions", seed), "--eval-only"])
            mp = os.path.join(root, dataset, "MedPromptCLIP", f"seed{seed}")
            run(f"MedPromptCLIP (pool {pool}) on {dataset} seed {seed}", mp,
                [*common(settings, dataset, "MedPromptCLIP", "multi_modal", seed), "--eval-only", "--model-dir", source])
    import aggregate

    aggregate.report("crossmodal", root)


def zeroshot(settings):
    names = datasets_of(settings.target)
    preflight(settings, names)
    root = os.path.join(settings.output, "zeroshot", settings.backbone.replace("/", "-"))
    modes = ["template", "ensemble", "descriptions"]
    run = Runner(settings, len(names) * len(modes))
    for dataset in names:
        for mode in modes:
            # Zero-shot evaluation has no randomness: one run per prompt mode.
            run(f"ZeroShotCLIP {mode} {dataset}", os.path.join(root, dataset, f"ZeroShotCLIP-{mode}", "seed1"),
                [*common(settings, dataset, "ZeroShotCLIP", mode, 1), "--eval-only"])
    import aggregate

    aggregate.report("zeroshot", root)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("base2new", "fewshot", "crossmodal", "zeroshot") or len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    protocol, target = argv[0], argv[1]
    try:
        import datasets  # noqa: F401
        import trainers
        from datasets.declared import lookup

        trainers.register_all()
        settings = Settings(target)
        lookup(target, settings.data)  # a dataset declared in DATA/<target>/ becomes known by name
        unknown = [m for m in settings.methods if m not in __import__("core.engine").engine.TRAINER_REGISTRY]
        if unknown:
            raise UserError(f"unknown method(s) in METHODS: {', '.join(unknown)}")
        if protocol == "base2new":
            base2new(settings)
        elif protocol == "fewshot":
            fewshot(settings)
        elif protocol == "crossmodal":
            crossmodal(settings, argv[2] if len(argv) > 2 else target)
        else:
            zeroshot(settings)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
