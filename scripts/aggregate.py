"""Tables, CSV/JSON/Markdown summaries and plots from results.json files (never from logs).

    python scripts/aggregate.py base2new output/base2new/demo-clip
    python scripts/aggregate.py fewshot output/fewshot/demo-clip
    python scripts/aggregate.py crossmodal output/crossmodal/demo-clip/pool-eye
    python scripts/aggregate.py zeroshot output/zeroshot/demo-clip
    python scripts/aggregate.py base2new output/base2new/pmc-clip --metric macro_f1   # the paper's table

--metric chooses the number every table shows (results.json key, percent): accuracy (default),
macro_f1, kappa, auc, specificity or ece; base-to-new HM is computed on it.

The runs are those the last sweep on ROOT asked for (ROOT/sweep.json), or without it every
results.json under ROOT. The method, its kind and every number come from results.json. A row with
fewer seeds than asked for says so (e.g. 2/3); a run asked for that is missing, incomplete or holds
other settings is listed and the exit status is 1. Summaries are written to ROOT/summary.{csv,json,md}
(and ROOT/fewshot.png for few-shot).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections import Counter, defaultdict

from tabulate import tabulate

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PROJECT_DIR not in sys.path:
    sys.path.insert(0, PROJECT_DIR)

from core.errors import UserError  # noqa: E402
from core.utils import atomic_open, write_json_atomic  # noqa: E402

MANIFEST = "sweep.json"
# Fields without which a results.json is not a finished run.
REQUIRED = ("trainer", "method", "kind", "dataset", "seed", "identity", "finished")
KINDS = ("zero-shot", "text-only", "image-trained")
# Metrics a table can show: results.json keys, in percent (core.evaluation.METRICS).
METRICS = ("accuracy", "macro_f1", "kappa", "auc", "specificity", "ece")


def read_result(folder):
    """(record, None) for a complete results.json in folder, else (None, what is wrong)."""
    path = os.path.join(folder, "results.json")
    if not os.path.isfile(path):
        return None, "no results.json"
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None, "results.json is not valid JSON (cut short?)"
    if not isinstance(record, dict) or any(k not in record for k in REQUIRED):
        return None, "results.json is incomplete (written by an older version, or edited)"
    no_test = ((record.get("identity") or {}).get("config") or {}).get("TEST", {}).get("NO_TEST", False)
    if record.get("accuracy") is None and not no_test:
        return None, "results.json has no accuracy"
    return record, None


def collect(root, manifest=None):
    """(records, problems): the runs asked for (manifest) or found under root, and what is wrong with others."""
    from train import identity_hash

    records, problems = [], []
    if manifest is None and os.path.isfile(os.path.join(root, MANIFEST)):
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    if manifest is not None:
        folders = [(os.path.join(root, e["path"]), e["identity"]) for e in manifest["runs"]]
    else:
        folders = []
        for d, subdirs, files in os.walk(root):
            # Folders set aside when a run was redone hold old results.
            subdirs[:] = [s for s in subdirs if ".replaced-" not in s]
            if "results.json" in files:
                folders.append((d, None))
    for folder, identity in sorted(folders):
        record, problem = read_result(folder)
        if record is not None and identity is not None and identity_hash(record["identity"]) != identity:
            record, problem = None, "results.json holds a run with other settings"
        if record is None:
            problems.append(f"{folder}: {problem}")
            continue
        record["path"] = folder
        records.append(record)
    return records, problems


def expected_seeds(records, manifest):
    """Seeds a row should have, by the trainer kind: one for zero-shot, else the sweep's seeds."""
    if manifest is not None:
        n = len(manifest.get("seeds") or [])
    else:
        per_row = Counter((r["dataset"], r["method"], r.get("num_shots")) for r in records
                          if r.get("kind") != "zero-shot" and r.get("subsample") != "new")
        n = max(per_row.values(), default=1)
    return lambda kind: 1 if kind == "zero-shot" else max(n, 1)


def seeds_cell(n, expected):
    return str(n) if n >= expected else f"{n}/{expected}"


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    m = sum(values) / len(values)
    # One seed has no spread to report.
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return m, sd


def harmonic_mean(base, new):
    if base is None or new is None:
        return None
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


def grid(table, headers, tablefmt):
    """A table with its cells as written (one decimal kept), labels left and numbers right."""
    return tabulate(table, headers=headers, tablefmt=tablefmt, disable_numparse=True,
                    colalign=("left",) + ("right",) * (len(headers) - 1))


def fmt(m, sd=None):
    if m is None:
        return "-"
    return f"{m:.1f}" if sd is None else f"{m:.1f} ± {sd:.1f}"


def method_order(methods, kinds):
    """Zero-shot first (template, ensemble, descriptions), then text-only, then image-trained methods."""
    variants = ["(template)", "(ensemble)", "(descriptions)", "(80+1 templates)"]

    def key(method):
        kind = kinds.get(method)
        variant = "(" + method.rsplit("(", 1)[-1]
        return (KINDS.index(kind) if kind in KINDS else len(KINDS),
                variants.index(variant) if variant in variants else len(variants), method.lower())

    return sorted(methods, key=key)


def describe(records, dataset, subsample=None):
    """'<split> split, N images' of a dataset's evaluations (the most common count)."""
    counts = Counter((r.get("split"), r.get("num_samples")) for r in records
                     if r["dataset"] == dataset and r.get("num_samples") and subsample in (None, r.get("subsample")))
    if not counts:
        return None
    (split, n), _ = counts.most_common(1)[0]
    return split, n


# ---------------------------------------------------------------------------- base-to-new


def base2new_summary(records, expected, metric="accuracy"):
    """Per dataset and method: base, new, HM of ``metric`` (mean and std over seeds); plus averages over datasets."""
    runs = defaultdict(lambda: defaultdict(dict))  # (dataset, method) -> seed -> {base, new}
    kinds = {}
    for r in records:
        if r.get(metric) is None or r.get("subsample") not in ("base", "new"):
            continue
        runs[(r["dataset"], r["method"])][r["seed"]][r["subsample"]] = r[metric]
        kinds[r["method"]] = r["kind"]
    rows = []
    for (dataset, method), seeds in sorted(runs.items()):
        base = [s.get("base") for s in seeds.values()]
        new = [s.get("new") for s in seeds.values()]
        hms = [harmonic_mean(s.get("base"), s.get("new")) for s in seeds.values()]
        b, bsd = mean_std(base)
        n, nsd = mean_std(new)
        h, hsd = mean_std(hms)
        complete = sum(1 for s in seeds.values() if "base" in s and "new" in s)
        rows.append({"dataset": dataset, "method": method, "kind": kinds[method], "seeds": complete,
                     "seeds_expected": expected(kinds[method]), "base": b, "base_std": bsd,
                     "new": n, "new_std": nsd, "hm": h, "hm_std": hsd})
    averages = []
    by_method = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    for method, items in by_method.items():
        b, _ = mean_std([i["base"] for i in items])
        n, _ = mean_std([i["new"] for i in items])
        h, _ = mean_std([i["hm"] for i in items])
        averages.append({"method": method, "kind": kinds[method], "datasets": len(items), "base": b, "new": n,
                         "hm_of_averages": harmonic_mean(b, n), "mean_of_hms": h})
    return rows, averages


def base2new_tables(rows, averages, records, context, tablefmt="simple", metric="accuracy"):
    kinds = {r["method"]: r["kind"] for r in rows}
    out = []
    for dataset in sorted({r["dataset"] for r in rows}):
        items = [r for r in rows if r["dataset"] == dataset]
        order = method_order([i["method"] for i in items], kinds)
        items.sort(key=lambda r: order.index(r["method"]))
        table = [[r["method"], fmt(r["base"], r["base_std"]), fmt(r["new"], r["new_std"]), fmt(r["hm"], r["hm_std"]),
                  seeds_cell(r["seeds"], r["seeds_expected"])] for r in items]
        halves = [describe(records, dataset, half) for half in ("base", "new")]
        split = ", ".join(f"{half} {d[1]} images" for half, d in zip(("base", "new"), halves) if d)
        split_name = next((d[0] for d in halves if d), "test")
        out.append(f"{dataset}: base-to-new, {context}, {split_name} split ({split}); "
                   f"{metric_title(metric)}, mean ± std over seeds\n"
                   + grid(table, ["method", "base", "new", "HM", "seeds"], tablefmt))
    order = method_order([a["method"] for a in averages], kinds)
    averages = sorted(averages, key=lambda a: order.index(a["method"]))
    table = [[a["method"], fmt(a["base"]), fmt(a["new"]), fmt(a["hm_of_averages"]), fmt(a["mean_of_hms"]), a["datasets"]]
             for a in averages]
    out.append(f"Average over datasets, {metric_title(metric)} (HM of the averaged base/new, and mean of per-dataset HMs)\n"
               + grid(table, ["method", "base", "new", "HM(avg)", "mean HM", "datasets"], tablefmt))
    return "\n\n".join(out)


# ---------------------------------------------------------------------------- few-shot


def shots_of(record):
    """Images per class the method saw: 0 for zero-shot and text-only methods."""
    return max(record.get("num_shots") or 0, 0) if record["kind"] == "image-trained" else 0


def fewshot_summary(records, expected, metric="accuracy"):
    """``metric`` (mean, std over seeds) per dataset, method and shots; average over datasets.
    Rows hold the value under the metric's name."""
    runs = defaultdict(list)
    kinds = {}
    for r in records:
        if r.get(metric) is not None:
            runs[(r["dataset"], r["method"], shots_of(r))].append(r[metric])
            kinds[r["method"]] = r["kind"]
    rows = []
    for (dataset, method, shots), accs in sorted(runs.items()):
        m, sd = mean_std(accs)
        rows.append({"dataset": dataset, "method": method, "kind": kinds[method], "shots": shots, metric: m,
                     "std": sd, "seeds": len(accs), "seeds_expected": expected(kinds[method])})
    avg = defaultdict(list)
    for r in rows:
        avg[(r["method"], r["shots"])].append(r[metric])
    for (method, shots), accs in sorted(avg.items()):
        rows.append({"dataset": "average", "method": method, "kind": kinds[method], "shots": shots,
                     metric: mean_std(accs)[0], "std": None, "seeds": None, "seeds_expected": None})
    return rows


def fewshot_cell(row, metric="accuracy"):
    cell = fmt(row[metric], row["std"])
    if row["seeds"] is not None and row["seeds"] < row["seeds_expected"]:
        cell += f" ({row['seeds']}/{row['seeds_expected']} seeds)"
    return cell


def fewshot_tables(rows, records, context, tablefmt="simple", metric="accuracy"):
    out = []
    kinds = {r["method"]: r["kind"] for r in rows}
    shots = sorted({r["shots"] for r in rows if r["shots"] > 0})
    datasets = sorted({r["dataset"] for r in rows if r["dataset"] != "average"})
    for dataset in datasets + (["average"] if len(datasets) > 1 else []):
        items = [r for r in rows if r["dataset"] == dataset]
        methods = method_order({r["method"] for r in items}, kinds)
        table = []
        for method in methods:
            cells = {r["shots"]: fewshot_cell(r, metric) for r in items if r["method"] == method}
            if 0 in cells:
                table.append([method + " (0-shot)", *([cells[0]] * len(shots))])
            else:
                table.append([method, *[cells.get(k, "-") for k in shots]])
        where = describe(records, dataset)
        split = f", {where[0]} split ({where[1]} images)" if where else ""
        out.append(f"{dataset}: few-shot, {context}{split}; {metric_title(metric)}, mean ± std over seeds\n"
                   + grid(table, ["method", *[f"{k} shots" for k in shots]], tablefmt))
    return "\n\n".join(out)


def fewshot_plot(rows, records, context, path, metric="accuracy"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = {r["method"]: r["kind"] for r in rows}
    datasets = sorted({r["dataset"] for r in rows if r["dataset"] != "average"})
    if len(datasets) > 1:
        datasets.append("average")
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        items = [r for r in rows if r["dataset"] == dataset]
        for method in method_order({r["method"] for r in items}, kinds):
            points = sorted((r["shots"], r[metric], r["std"] or 0.0) for r in items if r["method"] == method)
            if points and points[0][0] == 0:
                zero_shot = kinds[method] == "zero-shot"
                ax.axhline(points[0][1], linestyle="--" if zero_shot else ":", linewidth=1.2,
                           label=f"{method} (0-shot)", color="gray" if zero_shot else "black")
            else:
                x = [p[0] for p in points]
                m = [p[1] for p in points]
                sd = [p[2] for p in points]
                (line,) = ax.plot(x, m, marker="o", label=method)
                # The spread over seeds: mean ± std.
                ax.fill_between(x, [a - b for a, b in zip(m, sd)], [a + b for a, b in zip(m, sd)],
                                color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log", base=2)
        shots = sorted({r["shots"] for r in items if r["shots"] > 0})
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        ax.set_xlabel("shots per class")
        ax.set_ylabel(f"{metric} (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
    epochs = sorted({(r["method"], r.get("epochs")) for r in records
                     if r.get("epochs") and r["kind"] != "zero-shot" and r.get(metric) is not None})
    fig.suptitle(f"{context}; shaded: ± std over seeds\nepochs: "
                 + ", ".join(f"{m} {e}" for m, e in epochs), fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    # Beside the panels, so that no curve is hidden.
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------- zero-shot / cross-modal


def per_dataset_summary(records, expected, metric="accuracy"):
    runs = defaultdict(list)
    kinds = {}
    for r in records:
        if r.get(metric) is not None:
            runs[(r["dataset"], r["method"])].append(r[metric])
            kinds[r["method"]] = r["kind"]
    return [{"dataset": d, "method": m, "kind": kinds[m], metric: mean_std(a)[0], "std": mean_std(a)[1],
             "seeds": len(a), "seeds_expected": expected(kinds[m])} for (d, m), a in sorted(runs.items())]


def per_dataset_table(rows, context, tablefmt="simple", metric="accuracy"):
    kinds = {r["method"]: r["kind"] for r in rows}
    methods = method_order({r["method"] for r in rows}, kinds)
    datasets = sorted({r["dataset"] for r in rows})
    cell = {(r["dataset"], r["method"]): r for r in rows}
    table = [[d, *[fewshot_cell(cell[(d, m)], metric) if (d, m) in cell else "-" for m in methods]] for d in datasets]
    averages = [mean_std([cell[(d, m)][metric] for d in datasets if (d, m) in cell])[0] for m in methods]
    table.append(["average", *[fmt(a) for a in averages]])
    return (f"{context}; {metric_title(metric)} (mean ± std over seeds)\n"
            + grid(table, ["dataset", *methods], tablefmt))


# ---------------------------------------------------------------------------- output


def _write_csv(path, rows):
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    writer.writerows(rows)
    with atomic_open(path, "w", encoding="utf-8", newline="") as f:
        f.write(buf.getvalue())


def sweep_context(records, manifest):
    """'backbone X, seeds 1 2 3': what every table of the sweep shares."""
    backbones = sorted({r.get("backbone") for r in records if r.get("backbone")})
    # Zero-shot runs use one seed: the seeds are those of the other runs, if there are any.
    seeded = [r for r in records if r.get("kind") != "zero-shot"] or records
    if manifest and seeded is not records:
        seeds = manifest.get("seeds") or []
    else:
        seeds = sorted({r["seed"] for r in seeded})
    return f"backbone {', '.join(backbones) or '?'}, seeds {' '.join(str(s) for s in seeds)}"


def metric_title(metric):
    """How tables name the metric they show."""
    return {"accuracy": "accuracy %", "macro_f1": "macro-F1 %", "kappa": "Cohen's kappa x 100",
            "auc": "macro-AUC %", "specificity": "macro specificity %", "ece": "ECE % (15 bins, lower is better)"}[metric]


def description_context(records):
    """'; descriptions: <files>' when runs read description files other than the project's own
    llm_descriptions/ (the original release's templates/, or a DESCRIPTIONS_FILE), else ''."""
    files = {}
    for r in records:
        for item in r.get("description_files") or []:
            if isinstance(item, dict) and item.get("source") not in (None, "project"):
                files[item["path"]] = item.get("sha256", "")[:12]
    if not files:
        return ""
    folders = sorted({os.path.dirname(p) for p in files})
    if len(files) > 3:
        return f"; descriptions: {len(files)} files in {', '.join(folders)}"
    return "; descriptions: " + ", ".join(f"{p} (sha256 {h})" for p, h in sorted(files.items()))


def report(protocol, root, quiet=False, manifest=None, metric="accuracy"):
    """Build the protocol's tables of ``metric`` from root, write summary files beside the runs, print the table.

    Returns the summary data; its "problems" lists the runs asked for that are missing or broken.
    """
    if manifest is None and os.path.isfile(os.path.join(root, MANIFEST)):
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric}; use one of {', '.join(METRICS)}")
    records, problems = collect(root, manifest)
    if not records:
        raise UserError(f"no complete results.json under {root}" + (f" ({len(problems)} broken)" if problems else ""))
    expected = expected_seeds(records, manifest)
    context = sweep_context(records, manifest) + description_context(records)
    if protocol == "base2new":
        rows, averages = base2new_summary(records, expected, metric)
        text = base2new_tables(rows, averages, records, context, metric=metric)
        markdown = base2new_tables(rows, averages, records, context, "github", metric)
        data = {"per_dataset": rows, "average": averages}
        _write_csv(os.path.join(root, "summary_average.csv"), averages)
    elif protocol == "fewshot":
        rows = fewshot_summary(records, expected, metric)
        text = fewshot_tables(rows, records, context, metric=metric)
        markdown = fewshot_tables(rows, records, context, "github", metric)
        data = {"rows": rows}
        fewshot_plot(rows, records, context, os.path.join(root, "fewshot.png"), metric)
    elif protocol in ("crossmodal", "zeroshot"):
        rows = per_dataset_summary(records, expected, metric)
        text = per_dataset_table(rows, context, metric=metric)
        markdown = per_dataset_table(rows, context, "github", metric)
        data = {"rows": rows}
    else:
        raise UserError(f"unknown protocol {protocol}; use base2new, fewshot, crossmodal or zeroshot")
    data["metric"] = metric
    data["problems"] = problems
    _write_csv(os.path.join(root, "summary.csv"), rows)
    write_json_atomic(os.path.join(root, "summary.json"), data)
    with atomic_open(os.path.join(root, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    if not quiet:
        print()
        print(text)
        print(f"\nsummaries: {os.path.join(root, 'summary.{csv,json,md}')}"
              + (f", plot: {os.path.join(root, 'fewshot.png')}" if protocol == "fewshot" else ""))
    if problems:
        print(f"error: {len(problems)} of the runs asked for are missing or broken (rows above show the seeds they "
              f"have); rerun the sweep to redo them:", file=sys.stderr)
        for line in problems[:20]:
            print(f"  {line}", file=sys.stderr)
        if len(problems) > 20:
            print(f"  ... and {len(problems) - 20} more", file=sys.stderr)
    return data


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    metric = "accuracy"
    if "--metric" in argv:
        i = argv.index("--metric")
        if i + 1 >= len(argv) or argv[i + 1] not in METRICS:
            print(f"error: --metric needs one of {', '.join(METRICS)}", file=sys.stderr)
            return 2
        metric = argv[i + 1]
        del argv[i:i + 2]
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        data = report(argv[0], argv[1], metric=metric)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 1 if data["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
