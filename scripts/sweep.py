"""Sweeps behind scripts/*.sh: methods x datasets x seeds (x shots), reusing finished runs.

    python scripts/sweep.py base2new TARGET [--status]
    python scripts/sweep.py fewshot TARGET [--status]
    python scripts/sweep.py crossmodal TARGET [POOL] [--status]
    python scripts/sweep.py zeroshot TARGET [--status]
    ... [--skip-unavailable]

TARGET is a dataset, a modality group (fundus, oct, pathology, xray, ..., eye, all) or demo,
or a dataset declared in data (DATA/<name>/dataset.yaml, written by python -m datasets.make_split --folder).
--status shows which runs are done, running, failed or pending, and starts nothing.
Before the first run every listed image is decoded (once; remembered) and the descriptions the
methods need are checked: any problem stops the sweep with the full list. Rows that need
descriptions a dataset lacks stop it too, unless --skip-unavailable (SKIP_UNAVAILABLE=1) runs the others.
Summaries, plots and sweep.json go to OUTPUT/<protocol>/<backbone>/[pool-<POOL>/]<TARGET>/.
Settings come from environment variables (defaults in brackets):
  DATA      data root                                         [./data]
  OUTPUT    output root                                       [./output]
  BACKBONE  MODEL.BACKBONE.NAME     [demo-clip for demo, biomedclip for the biomedcoop suite, else pmc-clip]
  METHODS   methods for base2new and fewshot; "X+MedPromptCLIP" = X started from MedPromptCLIP
            prompts (fewshot)      [the trainers declaring the protocol in DEFAULT_IN: trainers/base.py]
  SEEDS     seeds                                             [1 2 3]
  SHOTS     shots for fewshot (and for image-based base2new)  [1 2 4 8 16] / [16]
  OPTS      extra KEY VALUE overrides for every run           []
  SKIP_UNAVAILABLE  1: as --skip-unavailable                 []
  DESCRIPTIONS  descriptions folder of every run: a folder of <dataset>.json, or
            original:<folder> for the original release's templates/ folder  [llm_descriptions]
  METRIC    what the tables show: accuracy, macro_f1, kappa, auc, specificity, ece   [accuracy]
  LAUNCHER  local (in this process), local:N (N worker processes, one GPU each when
            CUDA_VISIBLE_DEVICES lists several) or slurm (jobs through submitit)   [local]
  SWEEP_SLURM_PARTITION, SWEEP_SLURM_TIME (minutes or [D-]HH:MM:SS), SWEEP_SLURM_GPUS (per job),
  SWEEP_SLURM_CPUS (per job), SWEEP_SLURM_ARRAY_PARALLELISM (jobs at once)  [-, 240, 1, 8, 32]
  (the older SLURM_PARTITION, ... names are read too)
A run is reused only if its results.json is complete and holds the run asked for (the same settings of
its trainer and the same content of the files it reads); otherwise it runs again. A per-run lock keeps two sweeps from running the same run.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)
sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))

from _launch import (FAILED_FILE, Group, Run, check_launcher, execute_group, launch_local, launch_pool,  # noqa: E402
                     launch_slurm, lock_state, parse_launcher, run_state)
from core.errors import UserError  # noqa: E402

# The list of runs a sweep asked for, written into its output root for the aggregator.
MANIFEST = "sweep.json"
# Content digests of the runs' inputs (split, descriptions, weights files) by path, size and mtime.
DIGESTS = ".input_digests.json"
# A METHODS entry "<Trainer>+MedPromptCLIP": the trainer started from MedPromptCLIP prompts (the stacked
# few-shot rows, the paper's few-shot setting).
STACKED_SUFFIX = "+MedPromptCLIP"
SOURCE_TRAINER = "MedPromptCLIP"
MIN_CLASSES_BASE2NEW = 4


class Settings:
    def __init__(self, target):
        env = os.environ
        self.target = target
        self.data = env.get("DATA", os.path.join(PROJECT_DIR, "data"))
        self.output = env.get("OUTPUT", os.path.join(PROJECT_DIR, "output"))
        self.backbone = env.get("BACKBONE") or default_backbone_for(target)
        self.methods = env.get("METHODS", "").split()
        self.seeds = [int(s) for s in env.get("SEEDS", "1 2 3").split()]
        self.shots = [int(s) for s in env.get("SHOTS", "1 2 4 8 16").split()]
        self.base2new_shots = int(env.get("SHOTS", "16").split()[-1])
        self.opts = env.get("OPTS", "").split()
        if env.get("DESCRIPTIONS"):
            self.opts += ["DATASET.DESCRIPTIONS_DIR", env["DESCRIPTIONS"]]
        self.metric = env.get("METRIC") or "accuracy"
        self.launcher = env.get("LAUNCHER", "local")
        self.skip_unavailable = env.get("SKIP_UNAVAILABLE", "").strip().lower() in ("1", "true", "yes")
        # (dataset, row) pairs that cannot run (preflight fills it; with skip_unavailable they are left out).
        self.unavailable = set()


def default_backbone_for(target):
    """demo-clip for the demo, the backbone a suite's rows name (biomedclip for biomedcoop), else pmc-clip."""
    from datasets.catalog import default_backbone

    if target == "demo":
        return "demo-clip"
    try:
        return default_backbone(datasets_of(target), "pmc-clip")
    except UserError:
        return "pmc-clip"  # an unknown target is reported where the datasets are read


def datasets_of(target, data=None):
    from datasets.catalog import GROUPS, resolve_target

    try:
        return resolve_target(target)
    except KeyError as e:
        if data is not None and target not in GROUPS:
            if not os.path.isdir(data):
                raise UserError(f"unknown dataset or group '{target}': not in the catalog, and the data root "
                                f"DATA={data} does not exist; set DATA to the folder that holds {target}/") from None
            if not os.path.isdir(os.path.join(data, target)):
                raise UserError(f"{e.args[0]}; DATA={data} has no folder {target}/") from None
            raise UserError(f"DATA={data}/{target} holds no dataset.yaml; sort its images into {target}/<class>/ and run "
                            f"python -m datasets.make_split --root {data} --folder {target}") from None
        raise UserError(e.args[0]) from None


def needs_descriptions(dataset, row, classnames, sources=None):
    """A row that needs descriptions: (dataset, row label, [(descriptions dataset, class names)])."""
    return dataset, row, list(sources) if sources is not None else [(dataset, list(classnames))]


def preflight(settings, names, rows=()):
    """Stop before training anything if a dataset folder, an image, a descriptions file or the backbone's
    weights is missing or broken. ``rows`` (needs_descriptions) are the rows that read descriptions; those
    that cannot run are listed, and with settings.skip_unavailable recorded in settings.unavailable instead."""
    from datasets.catalog import get_entry
    from datasets.check import descriptions_problem, how_to_get_descriptions, listed_image_paths, undecodable_images
    from datasets.split_files import (image_folder, image_presence, load_split_file, locate_split, missing_split_message,
                                      outside_message)
    from clipkit.backbones import check_backbone
    from clipkit.descriptions import descriptions_path

    problems = []
    folder = dict(zip(settings.opts[::2], settings.opts[1::2])).get("DATASET.DESCRIPTIONS_DIR", "")
    for name in names:
        entry = get_entry(name)
        if folder.startswith("original:") and rows and not os.path.isfile(descriptions_path(name, folder)):
            problems.append(f"dataset {name}: no file {descriptions_path(name, folder)} in the original release's "
                            f"folder (DESCRIPTIONS={folder})")
        split_path, kind = locate_split(settings.data, entry)
        images = os.path.join(image_folder(settings.data, entry), "")
        if entry.generated:
            continue
        if split_path is None:
            option = f"--folder {name}" if entry.declared_in else f"--dataset {name}"
            problems.append(f"dataset {name}: " + missing_split_message(settings.data, entry, option))
            continue
        split = load_split_file(split_path)[0]
        found, listed, first_missing, outside = image_presence(settings.data, entry, split)
        if outside:
            problems.append(outside_message(entry, split_path, images, outside))
            continue
        if found < listed:
            problems.append(
                f"dataset {name}: {found}/{listed} images of the {'shipped' if kind == 'shipped' else 'dataset'} split "
                f"found under {images} (first missing: {first_missing})"
            )
            continue
        for path, error in undecodable_images(settings.data, listed_image_paths(settings.data, entry, split)):
            problems.append(f"dataset {name}: {path} cannot be decoded ({error}); replace it with a readable copy, "
                            f"or remove it and rerun python -m datasets.make_split")
    unavailable = {}
    for dataset, row, sources in rows:
        for source, classnames in sources:
            path, problem = descriptions_problem(source, classnames)
            if problem == "missing":
                unavailable[(dataset, row)] = (f"{row} on {dataset}: no descriptions file {path}; generate it: "
                                               f"{how_to_get_descriptions(source, settings.data)}")
                break
            if problem:
                problems.append(f"{row} on {dataset}: {problem}")
                break
    if unavailable and settings.skip_unavailable:
        settings.unavailable = set(unavailable)
        print(f"skipped {len(unavailable)} row(s) that cannot run (--skip-unavailable):")
        for line in unavailable.values():
            print(f"  - {line}")
    elif unavailable:
        problems += list(unavailable.values())
        problems.append("to run the other rows without these, rerun with --skip-unavailable (SKIP_UNAVAILABLE=1 "
                        "for the .sh scripts)")
    opts = dict(zip(settings.opts[::2], settings.opts[1::2]))
    try:
        check_backbone(settings.backbone, opts.get("MODEL.BACKBONE.PRETRAINED", ""), opts.get("MODEL.BACKBONE.CACHE_DIR", ""))
    except UserError as e:
        problems.append(str(e))
    if problems:
        raise UserError(
            f"cannot run {settings.target} (data root DATA={settings.data}, backbone BACKBONE={settings.backbone}); "
            f"nothing was started:\n" + "\n".join(f"  - {p}" for p in problems)
        )


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


def trainer_of(method):
    """The trainer class of a METHODS entry ("X" or "X+MedPromptCLIP")."""
    from trainers import trainer_class

    return trainer_class(method.removesuffix(STACKED_SUFFIX))


def kind_of(method):
    """The trainer's kind from the registry: zero-shot, text-only, image-trained or feature-based."""
    return trainer_of(method).KIND


def uses_shots(kind):
    """Whether runs of this kind train on DATASET.NUM_SHOTS images per class."""
    return kind in ("image-trained", "feature-based")


def default_methods(protocol):
    """METHODS when unset: the trainers declaring ``protocol`` in DEFAULT_IN (few-shot: and "stacked"),
    zero-shot first, then text-only, image-trained, feature-based."""
    from trainers import trainer_class, trainer_names

    order = ("zero-shot", "text-only", "image-trained", "feature-based")
    methods = []
    for name in sorted(trainer_names(), key=lambda n: (order.index(trainer_class(n).KIND), n.lower())):
        declared = trainer_class(name).DEFAULT_IN
        if protocol in declared:
            methods.append(name)
        if protocol == "fewshot" and "stacked" in declared:
            methods.append(name + STACKED_SUFFIX)
    return methods


def check_methods(settings, protocol):
    """Every METHODS entry has a recipe for the protocol (one line naming those that do not)."""
    if protocol not in ("base2new", "fewshot"):
        return
    if not settings.methods:
        settings.methods = default_methods(protocol)
    for method in settings.methods:
        stacked = method.endswith(STACKED_SUFFIX)
        cls = trainer_of(method)
        needed = "stacked" if stacked else protocol
        if stacked and (protocol != "fewshot" or cls.PROMPT_SHAPE_KEYS is None):
            raise UserError(f"METHODS: {method} is not a method of the {protocol} sweep; "
                            f"'X{STACKED_SUFFIX}' is few-shot only, for trainers that start from MedPromptCLIP prompts")
        if needed not in cls.RECIPES:
            have = ", ".join(p for p in cls.RECIPES if p != "stacked") or "none"
            raise UserError(f"METHODS: {method} has no {needed} recipe, so it cannot run in the {protocol} sweep "
                            f"(its protocols: {have}); leave it out of METHODS")


def opts_tag(opts):
    """A short hash of the OPTS that change what a run computes ('' without such OPTS), for folder names."""
    from runs import not_identity

    pairs = sorted((k, v) for k, v in zip(opts[::2], opts[1::2]) if k not in not_identity())
    if not pairs:
        return ""
    return hashlib.sha256(json.dumps(pairs).encode("utf-8")).hexdigest()[:8]


class Plan:
    """The groups of runs of one sweep, with their folders (Dassl/CoOp layout):
    ROOT/<dataset>/shots_<N>/<trainer>/<recipe>[-<hash of OPTS>]/seed<k>[/base|/new]."""

    def __init__(self, protocol, settings, root):
        self.protocol, self.settings, self.root = protocol, settings, root
        # Summaries, plots and sweep.json of this target: another target's never overwrite them.
        self.summary_dir = os.path.join(root, settings.target)
        self.groups = []
        self.tag = opts_tag(settings.opts)

    def folder(self, dataset, trainer, recipe, seed, shots=0, label=None):
        """The run folder; ``recipe`` is a protocol or recipe name, the folder names the recipe file it picks."""
        from trainers.recipes import recipe_file

        stem = os.path.splitext(os.path.basename(recipe_file(trainer, recipe, dataset, shots or None)))[0]
        name = stem + (f"-{self.tag}" if self.tag else "")
        return os.path.join(self.root, dataset, f"shots_{shots}", label or trainer, name, f"seed{seed}")

    def run(self, label, out, args):
        # Options first: everything after the first KEY VALUE pair is read as overrides.
        return Run(label, out, ["--output-dir", out, "--feature-cache", os.path.join(self.settings.output, "feature_cache"),
                                *args, "MODEL.BACKBONE.NAME", self.settings.backbone, *self.settings.opts])

    def group(self, runs, after=()):
        group = Group(f"g{len(self.groups) + 1}", list(runs), [g.name for g in after])
        self.groups.append(group)
        return group

    @property
    def runs(self):
        return [r for g in self.groups for r in g.runs]

    def resolve(self):
        """Each run's identity (its resolved config): a bad setting stops the sweep before anything runs."""
        from runs import identity_hash, resolve_run

        known = {}
        for run in self.runs:
            _, run.identity = resolve_run(run.argv, known)
            known[os.path.abspath(run.out)] = identity_hash(run.identity)

    def manifest(self):
        """What the aggregator checks: every run asked for, with its identity hash."""
        from runs import identity_hash

        return {"protocol": self.protocol, "target": self.settings.target, "backbone": self.settings.backbone,
                "seeds": self.settings.seeds, "opts": self.settings.opts,
                "skipped": sorted(f"{row} on {dataset}" for dataset, row in self.settings.unavailable),
                "runs": [{"path": os.path.relpath(r.out, self.summary_dir), "identity": identity_hash(r.identity)}
                         for r in self.runs]}


def base2new(settings):
    from datasets.catalog import get_entry

    names = datasets_of(settings.target)
    kept = [n for n in names if get_entry(n).num_classes >= MIN_CLASSES_BASE2NEW]
    for n in names:
        if n not in kept:
            print(f"skipped {n}: {get_entry(n).num_classes} classes, base-to-new needs at least {MIN_CLASSES_BASE2NEW}")
    if not kept:
        raise UserError(f"no dataset in {settings.target} has {MIN_CLASSES_BASE2NEW} or more classes")
    from core.data import subsample_classnames

    # Methods that read descriptions train on the base classes' (evaluating on new classes reads none); the
    # ZeroShotCLIP (descriptions) row reads every class's.
    preflight(settings, kept, [needs_descriptions(d, m, subsample_classnames(get_entry(d).classnames, "base"))
                               for d in kept for m in settings.methods if trainer_of(m).NEEDS_DESCRIPTIONS]
              + [needs_descriptions(d, "ZeroShotCLIP (descriptions)", get_entry(d).classnames)
                 for d in kept if "ZeroShotCLIP" in settings.methods])
    plan = Plan("base2new", settings, os.path.join(settings.output, "base2new", settings.backbone.replace("/", "-")))
    for dataset in kept:
        for method in settings.methods:
            if (dataset, method) in settings.unavailable:
                continue
            kind = kind_of(method)
            # Zero-shot CLIP gives two reference rows: the dataset's template and the description ensemble.
            for recipe in ("template", "descriptions") if method == "ZeroShotCLIP" else ("base2new",):
                if recipe == "descriptions" and (dataset, "ZeroShotCLIP (descriptions)") in settings.unavailable:
                    continue
                base2new_runs(plan, settings, dataset, method, kind, recipe)
    return plan


def base2new_runs(plan, settings, dataset, method, kind, recipe):
    """The runs of one method (and recipe) on one dataset: base, and new with the base run's prompts."""
    shots = settings.base2new_shots if uses_shots(kind) else 0
    # Zero-shot evaluation has no randomness: one seed.
    for seed in settings.seeds[:1] if kind == "zero-shot" else settings.seeds:
        folder = plan.folder(dataset, method, recipe, seed, shots)
        base_dir, new_dir = os.path.join(folder, "base"), os.path.join(folder, "new")
        args = common(settings, dataset, method, recipe, seed)
        name = f"{method}{' ' + recipe if kind == 'zero-shot' else ''} {dataset} seed {seed}"
        if kind == "zero-shot":
            plan.group([plan.run(f"{name} base", base_dir, [*args, "--eval-only", "DATASET.SUBSAMPLE_CLASSES", "base"]),
                        plan.run(f"{name} new", new_dir, [*args, "--eval-only", "DATASET.SUBSAMPLE_CLASSES", "new"])])
            continue
        shot_args = ["DATASET.NUM_SHOTS", str(shots)] if uses_shots(kind) else []
        plan.group([
            plan.run(f"{name} train base", base_dir, [*args, *shot_args, "DATASET.SUBSAMPLE_CLASSES", "base"]),
            plan.run(f"{name} test new", new_dir,
                     [*args, "--eval-only", "--model-dir", base_dir, "DATASET.SUBSAMPLE_CLASSES", "new"]),
        ])


def stacking_overrides(settings, dataset, trainer):
    """Overrides giving the MedPromptCLIP run ``trainer``'s stacked recipe's text prompt shape ([] if it has it)."""
    from trainers.recipes import recipe_file, resolve, source_overrides

    ds = dataset_config(dataset)
    source = resolve(SOURCE_TRAINER, recipe_file(SOURCE_TRAINER, "fewshot", dataset), ds, settings.opts)
    target = resolve(trainer, recipe_file(trainer, "stacked", dataset), ds, settings.opts)
    return source_overrides(source, trainer, target)


def fewshot(settings):
    """Per dataset: zero-shot methods once, text-only methods once per seed (the 0-shot line), methods
    trained on images per seed and shots, and "X+MedPromptCLIP" per seed and shots after the
    MedPromptCLIP run its prompts start from. Without descriptions (--skip-unavailable) the MedPromptCLIP
    line and the rows started from it are left out."""
    from datasets.catalog import get_entry

    names = datasets_of(settings.target)
    readers = [m for m in settings.methods if trainer_of(m).NEEDS_DESCRIPTIONS]
    if any(m.endswith(STACKED_SUFFIX) for m in settings.methods) and SOURCE_TRAINER not in readers:
        readers.append(SOURCE_TRAINER)  # the stacked rows start from its prompts
    preflight(settings, names, [needs_descriptions(d, m, get_entry(d).classnames) for d in names for m in readers])
    plan = Plan("fewshot", settings, os.path.join(settings.output, "fewshot", settings.backbone.replace("/", "-")))
    stacked = [m.removesuffix(STACKED_SUFFIX) for m in settings.methods if m.endswith(STACKED_SUFFIX)]
    plain = [m for m in settings.methods if not m.endswith(STACKED_SUFFIX)]
    zs_seed = settings.seeds[0]  # zero-shot evaluation has no randomness: one seed
    for dataset in names:
        reshapes = {trainer: stacking_overrides(settings, dataset, trainer) for trainer in stacked}
        text_rows = (dataset, SOURCE_TRAINER) not in settings.unavailable
        for method in plain:
            if kind_of(method) == "zero-shot" and (dataset, method) not in settings.unavailable:
                plan.group([plan.run(f"{method} {dataset}", plan.folder(dataset, method, "fewshot", zs_seed),
                                     [*common(settings, dataset, method, "fewshot", zs_seed), "--eval-only"])])
        for seed in settings.seeds:
            source_groups = {}
            if text_rows and (SOURCE_TRAINER in plain or stacked):
                # MedPromptCLIP on all classes: the 0-shot line, and the prompts stacking starts from when they fit.
                source = plan.folder(dataset, SOURCE_TRAINER, "fewshot", seed)
                source_groups[()] = source, plan.group([plan.run(
                    f"{SOURCE_TRAINER} {dataset} seed {seed}", source, common(settings, dataset, SOURCE_TRAINER, "fewshot", seed))])
            for reshape in dict.fromkeys(tuple(r) for r in reshapes.values() if r and text_rows):
                # The 0-shot run's prompts do not fit a stacked recipe: its rows start from a MedPromptCLIP run
                # of the same recipe with the stacked recipe's text context (not evaluated, not a row).
                label = f"{SOURCE_TRAINER}-source" + (f"-{len(source_groups)}" if len(source_groups) > 1 else "")
                source = plan.folder(dataset, SOURCE_TRAINER, "fewshot", seed, label=label)
                source_groups[reshape] = source, plan.group([plan.run(
                    f"{SOURCE_TRAINER} {dataset} seed {seed} ({' '.join(reshape)})", source,
                    [*common(settings, dataset, SOURCE_TRAINER, "fewshot", seed), "TEST.NO_TEST", "True", *reshape])])
            for method in plain:
                if (dataset, method) in settings.unavailable:
                    continue
                if kind_of(method) == "text-only" and method != SOURCE_TRAINER:
                    plan.group([plan.run(f"{method} {dataset} seed {seed}", plan.folder(dataset, method, "fewshot", seed),
                                         common(settings, dataset, method, "fewshot", seed))])
                if not uses_shots(kind_of(method)):
                    continue
                for shots in settings.shots:
                    args = [*common(settings, dataset, method, "fewshot", seed, shots), "DATASET.NUM_SHOTS", str(shots)]
                    plan.group([plan.run(f"{method} {dataset} {shots}-shot seed {seed}",
                                         plan.folder(dataset, method, "fewshot", seed, shots), args)])
            for trainer in stacked if text_rows else ():
                source, source_group = source_groups[tuple(reshapes[trainer])]
                for shots in settings.shots:
                    args = [*common(settings, dataset, trainer, "stacked", seed), "--init-from", source,
                            "DATASET.NUM_SHOTS", str(shots)]
                    plan.group([plan.run(f"{trainer}{STACKED_SUFFIX} {dataset} {shots}-shot seed {seed}",
                                         plan.folder(dataset, trainer, "stacked", seed, shots,
                                                     label=trainer + STACKED_SUFFIX), args)],
                               after=[source_group])
    return plan


def crossmodal(settings, pool):
    from datasets.catalog import get_entry

    names = datasets_of(settings.target)
    pool_sources = [(n, get_entry(n).classnames) for n in datasets_of(pool)]  # an unknown pool stops here
    preflight(settings, names, [needs_descriptions(d, "ZeroShotCLIP (descriptions)", get_entry(d).classnames)
                                for d in names]
              + [needs_descriptions(d, "MedPromptCLIP", (), pool_sources) for d in names])
    root = os.path.join(settings.output, "crossmodal", settings.backbone.replace("/", "-"), f"pool-{pool}")
    plan = Plan("crossmodal", settings, root)
    zs_seed = settings.seeds[0]  # zero-shot evaluation has no randomness: one seed
    for dataset in names:
        plan.group([plan.run(f"ZeroShotCLIP {mode} {dataset}", plan.folder(dataset, "ZeroShotCLIP", mode, zs_seed),
                             [*common(settings, dataset, "ZeroShotCLIP", mode, zs_seed), "--eval-only"])
                    for mode in ("template", "descriptions")
                    if (dataset, f"ZeroShotCLIP ({mode})") not in settings.unavailable])
    # The pool's descriptions are the same for every dataset: without them no MedPromptCLIP row runs.
    for seed in settings.seeds if (names[0], "MedPromptCLIP") not in settings.unavailable else ():
        # Training reads no image: the first target dataset only gives the run a dataset to name.
        source = plan.folder("train", "MedPromptCLIP", "multi_modal", seed)
        train_group = plan.group([plan.run(
            f"MedPromptCLIP pool {pool} seed {seed}", source,
            [*common(settings, names[0], "MedPromptCLIP", "multi_modal", seed), "TEST.NO_TEST", "True",
             "TRAINER.MEDPROMPTCLIP.DESCRIPTION_SOURCES", f"['{pool}']"])])
        for dataset in names:
            plan.group([plan.run(
                f"MedPromptCLIP (pool {pool}) on {dataset} seed {seed}",
                plan.folder(dataset, "MedPromptCLIP", "multi_modal", seed),
                [*common(settings, dataset, "MedPromptCLIP", "multi_modal", seed), "--eval-only", "--model-dir", source],
            )], after=[train_group])
    return plan


def zeroshot(settings):
    from datasets.catalog import get_entry

    names = datasets_of(settings.target)
    preflight(settings, names, [needs_descriptions(d, "ZeroShotCLIP (descriptions)", get_entry(d).classnames)
                                for d in names])
    plan = Plan("zeroshot", settings, os.path.join(settings.output, "zeroshot", settings.backbone.replace("/", "-")))
    seed = settings.seeds[0]  # zero-shot evaluation has no randomness: one run per prompt mode
    for dataset in names:
        for mode in ("template", "ensemble", "descriptions", "as_published"):
            if (dataset, f"ZeroShotCLIP ({mode})") in settings.unavailable:
                continue
            plan.group([plan.run(f"ZeroShotCLIP {mode} {dataset}", plan.folder(dataset, "ZeroShotCLIP", mode, seed),
                                 [*common(settings, dataset, "ZeroShotCLIP", mode, seed), "--eval-only"])])
    return plan


class Progress:
    """One line per run event and a bar over the runs (elapsed time and ETA)."""

    def __init__(self, total):
        from tqdm import tqdm

        self.total = total
        self.bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)

    def __call__(self, kind, run, **extra):
        from tqdm import tqdm

        log = os.path.join(run.out, "log.txt") if run is not None else ""
        if kind == "start":
            line = f"start  {run.label}  (log: {log})"
        elif kind == "reused":
            line = f"reused {run.label}: done before"
        elif kind == "done":
            line = f"done   {run.label}" + (f" in {extra['seconds']:.0f}s" if "seconds" in extra else "")
        elif kind == "failed":
            line = f"FAILED {run.label}: {extra['message']} (log: {log})"
        elif kind == "waiting":
            line = f"wait   {run.label}: another process ({extra['owner']}) is running it"
        elif kind == "replaced":
            line = f"rerun  {run.label}: {extra['reason']}; the old files are in {extra['moved']}"
        elif kind == "submitted":
            line = f"queued {run.label} as job {extra['job']}  (log: {log})"
        elif kind == "info":
            line = extra["message"]
        else:
            line = f"error: a worker stopped: {extra.get('message')}"
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
        if kind in ("reused", "done", "failed"):
            self.bar.update(1)

    def close(self):
        self.bar.close()


def execute(plan, launcher):
    """Run (or reuse) every run of the plan with the launcher; True if all succeeded."""
    from core.utils import write_json_atomic

    write_json_atomic(os.path.join(plan.summary_dir, MANIFEST), plan.manifest())
    kind, workers = launcher
    progress = Progress(len(plan.runs))
    try:
        if kind == "slurm":
            return launch_slurm(plan.groups, progress, plan.root)
        if workers > 1:
            return launch_pool(plan.groups, progress, workers)
        return launch_local(plan.groups, progress)
    finally:
        progress.close()


def status(plan):
    """Print how many runs are done, running, failed and pending, and the runs that are not done."""
    counts = {"done": 0, "running": 0, "failed": 0, "pending": 0}
    lines = []
    for run in plan.runs:
        state, detail = run_state(run)
        owner = lock_state(run) if state != "done" else None
        if state == "done":
            counts["done"] += 1
            continue
        if owner:
            counts["running"] += 1
            lines.append(f"running  {run.label}  (pid {owner.get('pid')} on {owner.get('host')}; log: {run.out}/log.txt)")
        elif os.path.isfile(os.path.join(run.out, FAILED_FILE)):
            counts["failed"] += 1
            with open(os.path.join(run.out, FAILED_FILE), encoding="utf-8") as f:
                lines.append(f"failed   {run.label}: {f.read().strip()}  (log: {run.out}/log.txt)")
        else:
            counts["pending"] += 1
            lines.append(f"pending  {run.label}" + (f"  ({detail})" if detail else ""))
    print(f"{plan.protocol} {plan.settings.target} under {plan.root}: {len(plan.runs)} runs: "
          + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for line in lines:
        print("  " + line)


def run_group_file(path):
    """Worker mode (one SLURM job): execute the group described in a JSON file; exit 1 if a run failed."""
    from core.utils import read_json
    from clipkit.backbones import keep_loaded_backbones

    group = Group.from_dict(read_json(path, what="run group"))

    def emit(kind, run, **extra):
        print(f"{kind}: {run.label} {extra or ''}".rstrip(), flush=True)

    with keep_loaded_backbones():
        return 0 if execute_group(group, emit) else 1


PROTOCOLS = {"base2new": base2new, "fewshot": fewshot, "crossmodal": crossmodal, "zeroshot": zeroshot}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if len(argv) == 2 and argv[0] == "--run-group":
            return run_group_file(argv[1])
        show_status = "--status" in argv
        if show_status:
            argv.remove("--status")
        skip_unavailable = "--skip-unavailable" in argv
        if skip_unavailable:
            argv.remove("--skip-unavailable")
        if not argv or argv[0] not in PROTOCOLS or len(argv) < 2:
            print(__doc__, file=sys.stderr)
            return 2
        protocol, target = argv[0], argv[1]
        from datasets.declared import lookup
        from trainers import trainer_names

        settings = Settings(target)
        settings.skip_unavailable = settings.skip_unavailable or skip_unavailable
        lookup(target, settings.data)  # a dataset declared in DATA/<target>/ becomes known by name
        launcher = parse_launcher(settings.launcher)
        if not show_status:
            check_launcher(launcher)
        unknown = [m for m in settings.methods if m.removesuffix(STACKED_SUFFIX) not in trainer_names()]
        import aggregate

        if settings.metric not in aggregate.METRICS:
            raise UserError(f"METRIC={settings.metric} is not a metric; use one of {', '.join(aggregate.METRICS)}")
        if unknown:
            raise UserError(f"unknown method(s) in METHODS: {', '.join(unknown)}; "
                            f"trainers: {', '.join(trainer_names())}")
        check_methods(settings, protocol)
        if protocol == "crossmodal":
            datasets_of(target, settings.data)
            plan = crossmodal(settings, argv[2] if len(argv) > 2 else target)
        else:
            datasets_of(target, settings.data)  # an unknown target names DATA
            plan = PROTOCOLS[protocol](settings)
        if not plan.runs:
            raise UserError(f"no row of {protocol} {target} can run (see the rows skipped above); generate the "
                            f"descriptions they need or choose other METHODS")
        from core.digests import STORE_VARIABLE, save_store, use_store

        os.environ[STORE_VARIABLE] = os.path.join(settings.output, DIGESTS)  # read by the runs' processes too
        use_store(os.environ[STORE_VARIABLE])  # digests of inputs, kept across sweeps
        plan.resolve()
        save_store()
        if show_status:
            status(plan)
            return 0
        ok = execute(plan, launcher)
        try:
            data = aggregate.report(protocol, plan.summary_dir, manifest=plan.manifest(), metric=settings.metric)
        except UserError as e:
            if ok:
                raise
            print(f"error: {e}", file=sys.stderr)
            data = None
        if not ok:
            print("error: some runs failed (FAILED lines above, details in their log.txt); fix the cause and "
                  "rerun: finished runs are reused", file=sys.stderr)
        return 0 if ok and data and not data["problems"] else 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full output root
        from core.utils import WRITE_ERRNOS, write_error_message

        if e.errno not in WRITE_ERRNOS:
            raise
        print(f"error: {write_error_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
