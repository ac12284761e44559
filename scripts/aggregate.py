"""Tables, CSV/JSON/Markdown summaries and plots from results.json files (never from logs).

    python scripts/aggregate.py base2new output/base2new/demo-clip --target demo
    python scripts/aggregate.py fewshot output/fewshot/demo-clip --target demo --metric macro_f1
    python scripts/aggregate.py crossmodal output/crossmodal/demo-clip/pool-eye --target eye
    python scripts/aggregate.py zeroshot output/zeroshot/demo-clip/demo

--metric chooses the number every table shows (results.json key, percent): accuracy (default),
macro_f1, kappa, auc, specificity or ece; base-to-new HM is computed on it.

A sweep writes its summaries per target (the dataset or group it was given) into
ROOT/<target>/, with the list of runs it asked for (sweep.json). The runs are those of FOLDER/sweep.json
(FOLDER = ROOT/<target>, or ROOT itself if it holds a sweep.json or is the only target's), or without
it every results.json under FOLDER. The method, its kind and every number come from results.json.
A row with fewer seeds than asked for says so (e.g. 2/3); a cell trained on fewer images per class
than its column says is marked (*) and explained under the table; a run asked for that is missing,
incomplete or holds other settings is listed and the exit status is 1. Summaries are written to
FOLDER/summary.{csv,json,md} (and FOLDER/fewshot.png for few-shot).
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
KINDS = ("zero-shot", "text-only", "image-trained", "feature-based")
# The metrics of results.json a table can report (--metric); each is a number or None in every record.
METRICS = ("accuracy", "macro_f1", "kappa", "auc", "specificity", "ece")
METRIC_LABELS = {"accuracy": "accuracy %", "macro_f1": "macro-F1 %", "kappa": "Cohen's kappa x 100",
                 "auc": "macro-AUC %", "specificity": "macro specificity %", "ece": "ECE % (15 bins, lower is better)"}
# Marks a cell trained on fewer images per class than its column says.
SHORT_MARK = "*"


def metric_label(metric):
    return METRIC_LABELS.get(metric, metric)


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
    from runs import identity_hash

    records, problems = [], []
    if manifest is None and os.path.isfile(os.path.join(root, MANIFEST)):
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    if manifest is not None:
        folders = [(os.path.normpath(os.path.join(root, e["path"])), e["identity"]) for e in manifest["runs"]]
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
        # Distinct seeds of evaluated runs: a run that only trains (a stacking source, TEST.NO_TEST) is no seed.
        per_row = defaultdict(set)
        for r in records:
            if r.get("kind") != "zero-shot" and r.get("subsample") != "new" and r.get("accuracy") is not None:
                per_row[(r["dataset"], r["method"], r.get("num_shots"))].add(r["seed"])
        n = max((len(s) for s in per_row.values()), default=1)
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


def short_shots(record):
    """{"asked", "min", "classes"} if the run trained on fewer images per class than the shots asked, else None."""
    used = record.get("shots_used")
    asked = record.get("num_shots") or 0
    if record.get("kind") != "image-trained" or not isinstance(used, dict) or asked < 1:
        return None
    if used.get("min") is None or used["min"] >= asked:
        return None
    classes = sorted(c for c, n in (used.get("per_class") or {}).items() if n < asked)
    return {"asked": asked, "min": used["min"], "classes": classes}


def merge_short(infos):
    """One note for a cell from its seeds' short_shots (None if every seed had the shots asked)."""
    infos = [i for i in infos if i]
    if not infos:
        return None
    return {"asked": infos[0]["asked"], "min": min(i["min"] for i in infos),
            "classes": sorted({c for i in infos for c in i["classes"]})}


def short_note(dataset, method, short, column=None):
    where = f"{method} on {dataset}" + (f", {column}" if column else "")
    return (f"{SHORT_MARK} {where}: {len(short['classes'])} class(es) had fewer than {short['asked']} training images "
            f"(down to {short['min']}; {', '.join(short['classes'])}); all of theirs were used")


def with_notes(table, notes):
    return table + ("\n" + "\n".join(notes) if notes else "")


# ---------------------------------------------------------------------------- base-to-new


def base2new_summary(records, expected, metric="accuracy"):
    """Per dataset and method: base, new, HM of ``metric`` (mean and std over seeds); plus averages over datasets."""
    runs = defaultdict(lambda: defaultdict(dict))  # (dataset, method) -> seed -> {base, new}
    kinds, shorts = {}, defaultdict(list)
    for r in records:
        if r.get(metric) is None or r.get("subsample") not in ("base", "new"):
            continue
        runs[(r["dataset"], r["method"])][r["seed"]][r["subsample"]] = r[metric]
        kinds[r["method"]] = r["kind"]
        shorts[(r["dataset"], r["method"])].append(short_shots(r))
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
                     "new": n, "new_std": nsd, "hm": h, "hm_std": hsd, "metric": metric,
                     "short_shots": merge_short(shorts[(dataset, method)])})
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
        table = [[r["method"] + (SHORT_MARK if r.get("short_shots") else ""), fmt(r["base"], r["base_std"]),
                  fmt(r["new"], r["new_std"]), fmt(r["hm"], r["hm_std"]),
                  seeds_cell(r["seeds"], r["seeds_expected"])] for r in items]
        notes = [short_note(dataset, r["method"], r["short_shots"]) for r in items if r.get("short_shots")]
        halves = [describe(records, dataset, half) for half in ("base", "new")]
        split = ", ".join(f"{half} {d[1]} images" for half, d in zip(("base", "new"), halves) if d)
        split_name = next((d[0] for d in halves if d), "test")
        metric = items[0].get("metric", "accuracy")
        out.append(f"{dataset}: base-to-new, {context}, {split_name} split ({split}); "
                   f"{metric_label(metric)}, mean ± std over seeds\n"
                   + with_notes(grid(table, ["method", "base", "new", "HM", "seeds"], tablefmt), notes))
    order = method_order([a["method"] for a in averages], kinds)
    averages = sorted(averages, key=lambda a: order.index(a["method"]))
    table = [[a["method"], fmt(a["base"]), fmt(a["new"]), fmt(a["hm_of_averages"]), fmt(a["mean_of_hms"]), a["datasets"]]
             for a in averages]
    out.append(f"Average over datasets, {metric_label(metric)} (HM of the averaged base/new, and mean of per-dataset HMs)\n"
               + grid(table, ["method", "base", "new", "HM(avg)", "mean HM", "datasets"], tablefmt))
    return "\n\n".join(out)


# ---------------------------------------------------------------------------- few-shot


def shots_of(record):
    """Images per class the method saw: 0 for zero-shot and text-only methods."""
    return max(record.get("num_shots") or 0, 0) if record["kind"] in ("image-trained", "feature-based") else 0


def fewshot_summary(records, expected, metric="accuracy"):
    """``metric`` (mean, std over seeds) per dataset, method and shots; average over datasets."""
    runs = defaultdict(list)
    kinds, shorts = {}, defaultdict(list)
    for r in records:
        if r.get(metric) is not None:
            runs[(r["dataset"], r["method"], shots_of(r))].append(r[metric])
            kinds[r["method"]] = r["kind"]
            shorts[(r["dataset"], r["method"], shots_of(r))].append(short_shots(r))
    rows = []
    for (dataset, method, shots), accs in sorted(runs.items()):
        m, sd = mean_std(accs)
        rows.append({"dataset": dataset, "method": method, "kind": kinds[method], "shots": shots, metric: m,
                     "std": sd, "seeds": len(accs), "seeds_expected": expected(kinds[method]), "metric": metric,
                     "short_shots": merge_short(shorts[(dataset, method, shots)])})
    avg = defaultdict(list)
    avg_short = defaultdict(list)
    for r in rows:
        avg[(r["method"], r["shots"])].append(r[metric])
        avg_short[(r["method"], r["shots"])].append(r["short_shots"])
    for (method, shots), accs in sorted(avg.items()):
        rows.append({"dataset": "average", "method": method, "kind": kinds[method], "shots": shots,
                     metric: mean_std(accs)[0], "std": None, "seeds": None, "seeds_expected": None, "metric": metric,
                     "short_shots": merge_short(avg_short[(method, shots)])})
    return rows


def fewshot_cell(row):
    cell = fmt(row[row.get("metric", "accuracy")], row["std"]) + (SHORT_MARK if row.get("short_shots") else "")
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
            cells = {r["shots"]: fewshot_cell(r) for r in items if r["method"] == method}
            if 0 in cells:
                table.append([method + " (0-shot)", *([cells[0]] * len(shots))])
            else:
                table.append([method, *[cells.get(k, "-") for k in shots]])
        notes = [short_note(dataset, r["method"], r["short_shots"], f"{r['shots']} shots")
                 for r in items if r.get("short_shots") and dataset != "average"]
        if dataset == "average" and any(r.get("short_shots") for r in items):
            notes = [f"{SHORT_MARK} averages over datasets where some classes had fewer training images than the shots"]
        where = describe(records, dataset)
        split = f", {where[0]} split ({where[1]} images)" if where else ""
        metric = items[0].get("metric", "accuracy") if items else "accuracy"
        out.append(f"{dataset}: few-shot, {context}{split}; {metric_label(metric)}, mean ± std over seeds\n"
                   + with_notes(grid(table, ["method", *[f"{k} shots" for k in shots]], tablefmt), notes))
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
        ax.set_ylabel(metric_label(metric))
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
             "seeds": len(a), "seeds_expected": expected(kinds[m]), "metric": metric}
            for (d, m), a in sorted(runs.items())]


def per_dataset_table(rows, context, tablefmt="simple", metric="accuracy"):
    kinds = {r["method"]: r["kind"] for r in rows}
    methods = method_order({r["method"] for r in rows}, kinds)
    datasets = sorted({r["dataset"] for r in rows})
    cell = {(r["dataset"], r["method"]): r for r in rows}
    table = [[d, *[fewshot_cell(cell[(d, m)]) if (d, m) in cell else "-" for m in methods]] for d in datasets]
    metric = rows[0].get("metric", "accuracy") if rows else "accuracy"
    averages = [mean_std([cell[(d, m)][metric] for d in datasets if (d, m) in cell])[0] for m in methods]
    table.append(["average", *[fmt(a) for a in averages]])
    return (f"{context}; {metric_label(metric)} (mean ± std over seeds)\n"
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


# ---------------------------------------------------------------------------- published reference rows

PUBLISHED_DIR = os.path.join(PROJECT_DIR, "configs", "published")


def exact(value):
    """A published number as published (two decimals)."""
    return "-" if value is None else f"{value:.2f}"


def published_suites(protocol):
    """The published tables (configs/published/<suite>.json) that have a ``protocol`` table."""
    suites = []
    for name in sorted(os.listdir(PUBLISHED_DIR)) if os.path.isdir(PUBLISHED_DIR) else ():
        if name.endswith(".json"):
            with open(os.path.join(PUBLISHED_DIR, name), encoding="utf-8") as f:
                suite = json.load(f)
            if protocol in suite:
                suites.append(suite)
    return suites


def literature(protocol, rows, tablefmt="simple"):
    """Measured averages beside a suite's published ones, when every measured dataset is one of the suite's.

    Measured averages are over the suite's datasets that were run (a cell says k/n when fewer than the
    n the published average covers); a row is matched to a published one by its method label.
    Returns (text, data), or ("", None) when no published suite covers the measured datasets.
    """
    measured = {r["dataset"] for r in rows if r["dataset"] != "average"}
    for suite in published_suites(protocol):
        table_def = suite[protocol]
        datasets = table_def["datasets"]
        if not measured or not measured <= set(datasets):
            continue
        n = len(datasets)
        kinds = {m: row["kind"] for m, row in table_def["rows"].items()}
        kinds.update({r["method"]: r["kind"] for r in rows})
        methods = method_order(set(kinds), kinds)
        table, data = [], []
        if protocol == "fewshot":
            shots = sorted({int(k) for row in table_def["rows"].values() for k in row if k.isdigit()}
                           | {r["shots"] for r in rows if r["shots"] > 0})
            for method in methods:
                published = table_def["rows"].get(method)
                if published:
                    table.append([method, "published", *[exact(published.get(str(k))) for k in shots]])
                    data.append({"method": method, "source": "published", **{str(k): published.get(str(k)) for k in shots}})
                cells = defaultdict(list)
                for r in rows:
                    if r["method"] == method and r["dataset"] in datasets and r["accuracy"] is not None:
                        cells[r["shots"]].append(r["accuracy"])
                if not cells:
                    continue
                zero = 0 in cells
                values = {k: cells[0] if zero else cells.get(k, []) for k in shots}
                label = method + (" (0-shot)" if zero else "")
                table.append([label, "measured here", *[
                    "-" if not v else fmt(sum(v) / len(v)) + ("" if len(v) == n else f" ({len(v)}/{n})")
                    for v in values.values()]])
                data.append({"method": method, "source": "measured", **{
                    str(k): (sum(v) / len(v) if v else None) for k, v in values.items()},
                    "datasets": max(len(v) for v in values.values())})
            headers = ["method", "rows", *[f"{k} shots" for k in shots]]
        else:
            for method in methods:
                published = table_def["rows"].get(method)
                if published:
                    table.append([method, "published", exact(published["base"]), exact(published["new"]),
                                  exact(harmonic_mean(published["base"], published["new"])), "-", exact(published.get("hm")), n])
                    data.append({"method": method, "source": "published", **published})
                items = [r for r in rows if r["method"] == method and r["dataset"] in datasets]
                if not items:
                    continue
                b = mean_std([i["base"] for i in items])[0]
                nw = mean_std([i["new"] for i in items])[0]
                h = mean_std([i["hm"] for i in items])[0]
                count = f"{len(items)}/{n}" if len(items) < n else n
                table.append([method, "measured here", fmt(b), fmt(nw), fmt(harmonic_mean(b, nw)), fmt(h), "-", count])
                data.append({"method": method, "source": "measured", "base": b, "new": nw,
                             "hm_of_averages": harmonic_mean(b, nw), "mean_of_hms": h, "datasets": len(items)})
            headers = ["method", "rows", "base", "new", "HM(avg)", "mean HM", "reported HM", "datasets"]
        note = suite.get("notes", {}).get(protocol)
        text = (f"{suite['title']}, {'few-shot' if protocol == 'fewshot' else 'base-to-new'}: average over its {n} "
                f"datasets; 'published' rows: {suite['source']}; 'measured here' rows: this sweep, averaged over the "
                f"same datasets (k/{n}: only k of them measured)" + (f"; {note}" if note else "") + "\n"
                + grid(table, headers, tablefmt))
        return text, {"suite": suite["suite"], "datasets": datasets, "rows": data}
    return "", None


def with_literature(protocol, rows, text, markdown, metric="accuracy"):
    """The tables with the published comparison appended (when a suite covers the datasets and the table
    reports accuracy, the metric published), and its data."""
    if metric != "accuracy":
        return text, markdown, None
    plain, data = literature(protocol, rows)
    if not plain:
        return text, markdown, None
    return text + "\n\n" + plain, markdown + "\n\n" + literature(protocol, rows, "github")[0], data


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
    """Build the protocol's tables of ``metric`` from root, write summary files into root, print the table.

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
        text = base2new_tables(rows, averages, records, context)
        markdown = base2new_tables(rows, averages, records, context, "github")
        data = {"per_dataset": rows, "average": averages}
        _write_csv(os.path.join(root, "summary_average.csv"), averages)
        text, markdown, data["published"] = with_literature(protocol, rows, text, markdown, metric)
    elif protocol == "fewshot":
        rows = fewshot_summary(records, expected, metric)
        text, markdown = fewshot_tables(rows, records, context), fewshot_tables(rows, records, context, "github")
        data = {"rows": rows}
        text, markdown, data["published"] = with_literature(protocol, rows, text, markdown, metric)
        fewshot_plot(rows, records, context, os.path.join(root, "fewshot.png"), metric)
    elif protocol in ("crossmodal", "zeroshot"):
        rows = per_dataset_summary(records, expected, metric)
        text, markdown = per_dataset_table(rows, context), per_dataset_table(rows, context, "github")
        data = {"rows": rows}
    else:
        raise UserError(f"unknown protocol {protocol}; use base2new, fewshot, crossmodal or zeroshot")
    data["problems"] = problems
    data["metric"] = metric
    if manifest is not None:
        data["target"] = manifest.get("target")
        data["seeds"] = manifest.get("seeds")
    shorts = [short_note(r["dataset"], r["method"], r["short_shots"], f"{r['shots']} shots" if "shots" in r else None)
              for r in rows if r.get("short_shots") and r["dataset"] != "average"]
    _write_csv(os.path.join(root, "summary.csv"), [{k: v for k, v in r.items() if k != "short_shots"}
                                                    | {"short_shots": bool(r.get("short_shots"))} for r in rows])
    write_json_atomic(os.path.join(root, "summary.json"), data)
    with atomic_open(os.path.join(root, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    if not quiet:
        print()
        print(text)
        print(f"\nsummaries: {os.path.join(root, 'summary.{csv,json,md}')}"
              + (f", plot: {os.path.join(root, 'fewshot.png')}" if protocol == "fewshot" else ""))
        for note in shorts:
            print(f"warning: fewer training images than the shots asked: {note.lstrip(SHORT_MARK + ' ')}",
                  file=sys.stderr)
    if problems:
        print(f"error: {len(problems)} of the runs asked for are missing or broken (rows above show the seeds they "
              f"have); rerun the sweep to redo them:", file=sys.stderr)
        for line in problems[:20]:
            print(f"  {line}", file=sys.stderr)
        if len(problems) > 20:
            print(f"  ... and {len(problems) - 20} more", file=sys.stderr)
    return data


PROTOCOLS = ("base2new", "fewshot", "crossmodal", "zeroshot")


def summary_folder(root, target=""):
    """The folder whose sweep.json (or results.json files) a table is built from."""
    if not os.path.isdir(root):
        raise UserError(f"{root} does not exist; pass the folder a sweep wrote, e.g. output/base2new/demo-clip")
    targets = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, MANIFEST)))
    if target:
        folder = os.path.join(root, target)
        if not os.path.isdir(folder):
            raise UserError(f"no target '{target}' under {root}" + (f"; targets there: {', '.join(targets)}" if targets
                                                                     else "; no sweep has written summaries there"))
        return folder
    if os.path.isfile(os.path.join(root, MANIFEST)) or not targets:
        return root
    if len(targets) == 1:
        return os.path.join(root, targets[0])
    raise UserError(f"{root} holds the summaries of several targets ({', '.join(targets)}); choose one with --target")


def build_parser():
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message):  # one line, not the usage block
            self.exit(2, f"error: {message}; see python scripts/aggregate.py --help\n")

    p = Parser(prog="python scripts/aggregate.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("protocol", choices=PROTOCOLS, help="the sweep's protocol")
    p.add_argument("root", help="the sweep's output folder, OUTPUT/<protocol>/<backbone> (crossmodal: .../pool-<POOL>)")
    p.add_argument("--target", "--dataset", dest="target", default="",
                   help="the dataset or group the sweep was given (its summaries are in ROOT/<target>/)")
    p.add_argument("--metric", choices=METRICS, default="accuracy",
                   help="the results.json metric to tabulate (HM is computed on it); default accuracy")
    return p


def main(argv=None):
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        data = report(args.protocol, summary_folder(args.root, args.target), metric=args.metric)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 1 if data["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
