"""Sweeps behind scripts/*.sh: methods x datasets x seeds (x shots), reusing finished runs.

    python scripts/sweep.py base2new TARGET [--status]
    python scripts/sweep.py fewshot TARGET [--status]
    python scripts/sweep.py crossmodal TARGET [POOL] [--status]
    python scripts/sweep.py zeroshot TARGET [--status]

TARGET is a dataset, a modality group (fundus, oct, pathology, xray, ..., eye, all) or demo,
or a dataset declared in data (DATA/<name>/dataset.yaml, written by python -m datasets.make_split --folder).
--status shows which runs are done, running, failed or pending, and starts nothing.
Settings come from environment variables (defaults in brackets):
  DATA      data root                                         [./data]
  OUTPUT    output root                                       [./output]
  BACKBONE  MODEL.BACKBONE.NAME     [demo-clip for demo, biomedclip for the biomedcoop suite, else pmc-clip]
  METHODS   methods for base2new and fewshot; "X+MedPromptCLIP" = X started from MedPromptCLIP
            prompts (fewshot)      [the trainers declaring the protocol in DEFAULT_IN: trainers/base.py]
  SEEDS     seeds                                             [1 2 3]
  SHOTS     shots for fewshot (and for image-based base2new)  [1 2 4 8 16] / [16]
  OPTS      extra KEY VALUE overrides for every run           []
  LAUNCHER  local (in this process), local:N (N worker processes, one GPU each when
            CUDA_VISIBLE_DEVICES lists several) or slurm (jobs through submitit)   [local]
  SLURM_PARTITION, SLURM_TIME (minutes), SLURM_GPUS (per job), SLURM_CPUS (per job),
  SLURM_ARRAY_PARALLELISM (jobs at once)                      [-, 240, 1, 8, 32]
A run is reused only if its results.json is complete and holds the run asked for (the same resolved
config); otherwise it runs again. A per-run lock keeps two sweeps from running the same run.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT_DIR)
sys.path.insert(0, os.path.join(PROJECT_DIR, "scripts"))

from _launch import (FAILED_FILE, Group, Run, execute_group, launch_local, launch_pool, launch_slurm,  # noqa: E402
                     lock_state, parse_launcher, run_state)
from core.errors import UserError  # noqa: E402

# The list of runs a sweep asked for, written into its output root for the aggregator.
MANIFEST = "sweep.json"
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
        self.launcher = env.get("LAUNCHER", "local")


def default_backbone_for(target):
    """demo-clip for the demo, the backbone a suite's rows name (biomedclip for biomedcoop), else pmc-clip."""
    from datasets.catalog import default_backbone

    if target == "demo":
        return "demo-clip"
    try:
        return default_backbone(datasets_of(target), "pmc-clip")
    except UserError:
        return "pmc-clip"  # an unknown target is reported where the datasets are read


def datasets_of(target):
    from datasets.catalog import resolve_target

    try:
        return resolve_target(target)
    except KeyError as e:
        raise UserError(e.args[0]) from None


def preflight(settings, names):
    """Stop before training anything if a dataset folder or the backbone's weights are missing."""
    from datasets.catalog import get_entry
    from datasets.split_files import image_folder, image_presence, load_split_file, locate_split, missing_split_message
    from clipkit.backbones import check_backbone
    from clipkit.descriptions import descriptions_path

    problems = []
    for name in names:
        entry = get_entry(name)
        split_path, kind = locate_split(settings.data, entry)
        images = os.path.join(image_folder(settings.data, entry), "")
        if entry.generated:
            continue
        if split_path is None:
            option = f"--folder {name}" if entry.declared_in else f"--dataset {name}"
            problems.append(f"dataset {name}: " + missing_split_message(settings.data, entry, option))
            continue
        found, listed, first_missing = image_presence(settings.data, entry, load_split_file(split_path)[0])
        if found < listed:
            problems.append(
                f"dataset {name}: {found}/{listed} images of the {'shipped' if kind == 'shipped' else 'dataset'} split "
                f"found under {images} (first missing: {first_missing})"
            )
        readers = [m for m in settings.methods if trainer_of(m).NEEDS_DESCRIPTIONS]
        if entry.declared_in and readers and not os.path.isfile(descriptions_path(name)):
            problems.append(
                f"dataset {name}: no descriptions file {descriptions_path(name)} for {readers[0]}; name one in "
                f"{entry.declared_in} or generate it: python scripts/generate_descriptions.py {name} --root {settings.data}"
            )
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

        return {"protocol": self.protocol, "backbone": self.settings.backbone, "seeds": self.settings.seeds,
                "opts": self.settings.opts,
                "runs": [{"path": os.path.relpath(r.out, self.root), "identity": identity_hash(r.identity)}
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
    preflight(settings, kept)
    plan = Plan("base2new", settings, os.path.join(settings.output, "base2new", settings.backbone.replace("/", "-")))
    for dataset in kept:
        for method in settings.methods:
            kind = kind_of(method)
            recipe = "base2new"
            shots = settings.base2new_shots if uses_shots(kind) else 0
            # Zero-shot evaluation has no randomness: one seed.
            for seed in settings.seeds[:1] if kind == "zero-shot" else settings.seeds:
                folder = plan.folder(dataset, method, recipe, seed, shots)
                base_dir, new_dir = os.path.join(folder, "base"), os.path.join(folder, "new")
                args = common(settings, dataset, method, recipe, seed)
                name = f"{method} {dataset} seed {seed}"
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
    return plan


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
    MedPromptCLIP run its prompts start from."""
    names = datasets_of(settings.target)
    preflight(settings, names)
    plan = Plan("fewshot", settings, os.path.join(settings.output, "fewshot", settings.backbone.replace("/", "-")))
    stacked = [m.removesuffix(STACKED_SUFFIX) for m in settings.methods if m.endswith(STACKED_SUFFIX)]
    plain = [m for m in settings.methods if not m.endswith(STACKED_SUFFIX)]
    zs_seed = settings.seeds[0]  # zero-shot evaluation has no randomness: one seed
    for dataset in names:
        reshapes = {trainer: stacking_overrides(settings, dataset, trainer) for trainer in stacked}
        for method in plain:
            if kind_of(method) == "zero-shot":
                plan.group([plan.run(f"{method} {dataset}", plan.folder(dataset, method, "fewshot", zs_seed),
                                     [*common(settings, dataset, method, "fewshot", zs_seed), "--eval-only"])])
        for seed in settings.seeds:
            source_groups = {}
            if SOURCE_TRAINER in plain or stacked:
                # MedPromptCLIP on all classes: the 0-shot line, and the prompts stacking starts from when they fit.
                source = plan.folder(dataset, SOURCE_TRAINER, "fewshot", seed)
                source_groups[()] = source, plan.group([plan.run(
                    f"{SOURCE_TRAINER} {dataset} seed {seed}", source, common(settings, dataset, SOURCE_TRAINER, "fewshot", seed))])
            for reshape in dict.fromkeys(tuple(r) for r in reshapes.values() if r):
                # The 0-shot run's prompts do not fit a stacked recipe: its rows start from a MedPromptCLIP run
                # of the same recipe with the stacked recipe's text context (not evaluated, not a row).
                label = f"{SOURCE_TRAINER}-source" + (f"-{len(source_groups)}" if len(source_groups) > 1 else "")
                source = plan.folder(dataset, SOURCE_TRAINER, "fewshot", seed, label=label)
                source_groups[reshape] = source, plan.group([plan.run(
                    f"{SOURCE_TRAINER} {dataset} seed {seed} ({' '.join(reshape)})", source,
                    [*common(settings, dataset, SOURCE_TRAINER, "fewshot", seed), "TEST.NO_TEST", "True", *reshape])])
            for method in plain:
                if kind_of(method) == "text-only" and method != SOURCE_TRAINER:
                    plan.group([plan.run(f"{method} {dataset} seed {seed}", plan.folder(dataset, method, "fewshot", seed),
                                         common(settings, dataset, method, "fewshot", seed))])
                if not uses_shots(kind_of(method)):
                    continue
                for shots in settings.shots:
                    args = [*common(settings, dataset, method, "fewshot", seed, shots), "DATASET.NUM_SHOTS", str(shots)]
                    plan.group([plan.run(f"{method} {dataset} {shots}-shot seed {seed}",
                                         plan.folder(dataset, method, "fewshot", seed, shots), args)])
            for trainer in stacked:
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
    names = datasets_of(settings.target)
    datasets_of(pool)  # an unknown pool is an error before anything runs
    preflight(settings, names)
    root = os.path.join(settings.output, "crossmodal", settings.backbone.replace("/", "-"), f"pool-{pool}")
    plan = Plan("crossmodal", settings, root)
    zs_seed = settings.seeds[0]  # zero-shot evaluation has no randomness: one seed
    for dataset in names:
        plan.group([plan.run(f"ZeroShotCLIP {mode} {dataset}", plan.folder(dataset, "ZeroShotCLIP", mode, zs_seed),
                             [*common(settings, dataset, "ZeroShotCLIP", mode, zs_seed), "--eval-only"])
                    for mode in ("template", "descriptions")])
    for seed in settings.seeds:
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
    names = datasets_of(settings.target)
    preflight(settings, names)
    plan = Plan("zeroshot", settings, os.path.join(settings.output, "zeroshot", settings.backbone.replace("/", "-")))
    seed = settings.seeds[0]  # zero-shot evaluation has no randomness: one run per prompt mode
    for dataset in names:
        for mode in ("template", "ensemble", "descriptions"):
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

    write_json_atomic(os.path.join(plan.root, MANIFEST), plan.manifest())
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
        if not argv or argv[0] not in PROTOCOLS or len(argv) < 2:
            print(__doc__, file=sys.stderr)
            return 2
        protocol, target = argv[0], argv[1]
        from datasets.declared import lookup
        from trainers import trainer_names

        settings = Settings(target)
        lookup(target, settings.data)  # a dataset declared in DATA/<target>/ becomes known by name
        launcher = parse_launcher(settings.launcher)
        unknown = [m for m in settings.methods if m.removesuffix(STACKED_SUFFIX) not in trainer_names()]
        if unknown:
            raise UserError(f"unknown method(s) in METHODS: {', '.join(unknown)}; "
                            f"trainers: {', '.join(trainer_names())}")
        check_methods(settings, protocol)
        if protocol == "crossmodal":
            plan = crossmodal(settings, argv[2] if len(argv) > 2 else target)
        else:
            plan = PROTOCOLS[protocol](settings)
        plan.resolve()
        if show_status:
            status(plan)
            return 0
        ok = execute(plan, launcher)
        import aggregate

        try:
            data = aggregate.report(protocol, plan.root, manifest=plan.manifest())
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
    except KeyboardInterrupt:
        print("\ninterrupted; rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
