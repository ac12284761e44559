"""Tables, CSV/JSON/Markdown summaries and plots from results.json files (never from logs).

    python scripts/aggregate.py base2new output/base2new/demo-clip
    python scripts/aggregate.py fewshot output/fewshot/demo-clip
    python scripts/aggregate.py crossmodal output/crossmodal/demo-clip/pool-eye
    python scripts/aggregate.py zeroshot output/zeroshot/demo-clip

Runs are found as ROOT/<dataset>/<method>/.../results.json; the method is the folder
name under the dataset. Summaries are written to ROOT/summary.{csv,json,md}
(and ROOT/fewshot.png for few-shot).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from collections import defaultdict

from tabulate import tabulate

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PROJECT_DIR not in sys.path:
    sys.path.insert(0, PROJECT_DIR)

from core.utils import atomic_open, write_json_atomic  # noqa: E402


def collect(root):
    """Every results.json under root, with 'method' set from its folder: list of dicts."""
    records = []
    for dirpath, _, filenames in os.walk(root):
        if "results.json" not in filenames:
            continue
        rel = os.path.relpath(dirpath, root).split(os.sep)
        if len(rel) < 2:
            continue
        try:
            with open(os.path.join(dirpath, "results.json"), encoding="utf-8") as f:
                record = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError):
            print(f"warning: {os.path.join(dirpath, 'results.json')} is not valid JSON; left out", file=sys.stderr)
            continue
        record["method"] = rel[1]
        record["path"] = dirpath
        records.append(record)
    return records


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


def fmt(m, sd=None):
    if m is None:
        return "-"
    return f"{m:.1f}" if sd is None else f"{m:.1f} ± {sd:.1f}"


def method_order(methods):
    """Zero-shot first (template, ensemble, descriptions), then MedPromptCLIP, then the baselines."""
    families = ["ZeroShotCLIP", "MedPromptCLIP", "CoOp", "CoCoOp", "IVLP", "MaPLe"]
    variants = ["", "template", "ensemble", "descriptions"]

    def key(method):
        family, _, variant = method.split("+")[0].partition("-")
        return (families.index(family) if family in families else len(families),
                variants.index(variant) if variant in variants else len(variants), method)

    return sorted(methods, key=key)


# ---------------------------------------------------------------------------- base-to-new


def base2new_summary(records):
    """Per dataset and method: base, new, HM (mean and std over seeds); plus averages over datasets."""
    runs = defaultdict(lambda: defaultdict(dict))  # (dataset, method) -> seed -> {base, new}
    for r in records:
        if r.get("accuracy") is None or r.get("subsample") not in ("base", "new"):
            continue
        runs[(r["dataset"], r["method"])][r["seed"]][r["subsample"]] = r["accuracy"]
    rows = []
    for (dataset, method), seeds in sorted(runs.items()):
        base = [s.get("base") for s in seeds.values()]
        new = [s.get("new") for s in seeds.values()]
        hms = [harmonic_mean(s.get("base"), s.get("new")) for s in seeds.values()]
        b, bsd = mean_std(base)
        n, nsd = mean_std(new)
        h, hsd = mean_std(hms)
        rows.append({"dataset": dataset, "method": method, "seeds": len(seeds), "base": b, "base_std": bsd,
                     "new": n, "new_std": nsd, "hm": h, "hm_std": hsd})
    averages = []
    by_method = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    for method, items in by_method.items():
        b, _ = mean_std([i["base"] for i in items])
        n, _ = mean_std([i["new"] for i in items])
        h, _ = mean_std([i["hm"] for i in items])
        averages.append({"method": method, "datasets": len(items), "base": b, "new": n,
                         "hm_of_averages": harmonic_mean(b, n), "mean_of_hms": h})
    return rows, averages


def base2new_tables(rows, averages, tablefmt="simple"):
    out = []
    for dataset in sorted({r["dataset"] for r in rows}):
        items = [r for r in rows if r["dataset"] == dataset]
        order = method_order([i["method"] for i in items])
        items.sort(key=lambda r: order.index(r["method"]))
        table = [[r["method"], fmt(r["base"], r["base_std"]), fmt(r["new"], r["new_std"]), fmt(r["hm"], r["hm_std"]),
                  r["seeds"]] for r in items]
        out.append(f"{dataset} (accuracy %, mean ± std over seeds)\n"
                   + tabulate(table, headers=["method", "base", "new", "HM", "seeds"], tablefmt=tablefmt))
    order = method_order([a["method"] for a in averages])
    averages = sorted(averages, key=lambda a: order.index(a["method"]))
    table = [[a["method"], fmt(a["base"]), fmt(a["new"]), fmt(a["hm_of_averages"]), fmt(a["mean_of_hms"]), a["datasets"]]
             for a in averages]
    out.append("Average over datasets (HM of the averaged base/new, and mean of per-dataset HMs)\n"
               + tabulate(table, headers=["method", "base", "new", "HM(avg)", "mean HM", "datasets"], tablefmt=tablefmt))
    return "\n\n".join(out)


# ---------------------------------------------------------------------------- few-shot


def shots_of(record):
    return max(record.get("num_shots") or 0, 0) if record["trainer"] not in ("ZeroShotCLIP", "MedPromptCLIP") else 0


def fewshot_summary(records):
    """Accuracy (mean, std over seeds) per dataset, method and shots; average over datasets."""
    runs = defaultdict(list)
    for r in records:
        if r.get("accuracy") is not None:
            runs[(r["dataset"], r["method"], shots_of(r))].append(r["accuracy"])
    rows = []
    for (dataset, method, shots), accs in sorted(runs.items()):
        m, sd = mean_std(accs)
        rows.append({"dataset": dataset, "method": method, "shots": shots, "accuracy": m, "std": sd, "seeds": len(accs)})
    avg = defaultdict(list)
    for r in rows:
        avg[(r["method"], r["shots"])].append(r["accuracy"])
    for (method, shots), accs in sorted(avg.items()):
        rows.append({"dataset": "average", "method": method, "shots": shots, "accuracy": mean_std(accs)[0],
                     "std": None, "seeds": None})
    return rows


def fewshot_tables(rows, tablefmt="simple"):
    out = []
    shots = sorted({r["shots"] for r in rows if r["shots"] > 0})
    for dataset in sorted({r["dataset"] for r in rows}, key=lambda d: (d == "average", d)):
        items = [r for r in rows if r["dataset"] == dataset]
        methods = method_order({r["method"] for r in items})
        table = []
        for method in methods:
            cells = {r["shots"]: fmt(r["accuracy"], r["std"]) for r in items if r["method"] == method}
            if 0 in cells:
                table.append([method + " (0-shot)", *([cells[0]] * len(shots))])
            else:
                table.append([method, *[cells.get(k, "-") for k in shots]])
        out.append(f"{dataset} (accuracy %)\n"
                   + tabulate(table, headers=["method", *[f"{k} shots" for k in shots]], tablefmt=tablefmt))
    return "\n\n".join(out)


def fewshot_plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows}, key=lambda d: (d == "average", d))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4.5 * len(datasets), 3.6), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        items = [r for r in rows if r["dataset"] == dataset]
        for method in method_order({r["method"] for r in items}):
            points = sorted((r["shots"], r["accuracy"]) for r in items if r["method"] == method)
            if points and points[0][0] == 0:
                ax.axhline(points[0][1], linestyle="--" if method == "ZeroShotCLIP" else ":", linewidth=1.2,
                           label=f"{method} (0-shot)", color="gray" if method == "ZeroShotCLIP" else "black")
            else:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xscale("log", base=2)
        shots = sorted({r["shots"] for r in items if r["shots"] > 0})
        ax.set_xticks(shots, [str(k) for k in shots])
        ax.minorticks_off()
        ax.set_xlabel("shots per class")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(dataset)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- zero-shot / cross-modal


def per_dataset_summary(records):
    runs = defaultdict(list)
    for r in records:
        if r.get("accuracy") is not None:
            runs[(r["dataset"], r["method"])].append(r["accuracy"])
    return [{"dataset": d, "method": m, "accuracy": mean_std(a)[0], "std": mean_std(a)[1], "seeds": len(a)}
            for (d, m), a in sorted(runs.items())]


def per_dataset_table(rows, tablefmt="simple"):
    methods = method_order({r["method"] for r in rows})
    datasets = sorted({r["dataset"] for r in rows})
    cell = {(r["dataset"], r["method"]): r for r in rows}
    table = [[d, *[fmt(cell[(d, m)]["accuracy"], cell[(d, m)]["std"]) if (d, m) in cell else "-" for m in methods]]
             for d in datasets]
    averages = [mean_std([cell[(d, m)]["accuracy"] for d in datasets if (d, m) in cell])[0] for m in methods]
    table.append(["average", *[fmt(a) for a in averages]])
    return "accuracy % (mean ± std over seeds)\n" + tabulate(table, headers=["dataset", *methods], tablefmt=tablefmt)


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


def report(protocol, root, quiet=False):
    """Build the protocol's tables from root, write summary files beside the runs, print the table."""
    records = collect(root)
    if not records:
        raise SystemExit(f"no results.json under {root}")
    if protocol == "base2new":
        rows, averages = base2new_summary(records)
        text, markdown = base2new_tables(rows, averages), base2new_tables(rows, averages, "github")
        data = {"per_dataset": rows, "average": averages}
        _write_csv(os.path.join(root, "summary_average.csv"), averages)
    elif protocol == "fewshot":
        rows = fewshot_summary(records)
        text, markdown = fewshot_tables(rows), fewshot_tables(rows, "github")
        data = {"rows": rows}
        fewshot_plot(rows, os.path.join(root, "fewshot.png"))
    elif protocol in ("crossmodal", "zeroshot"):
        rows = per_dataset_summary(records)
        text, markdown = per_dataset_table(rows), per_dataset_table(rows, "github")
        data = {"rows": rows}
    else:
        raise SystemExit(f"unknown protocol {protocol}")
    _write_csv(os.path.join(root, "summary.csv"), rows)
    write_json_atomic(os.path.join(root, "summary.json"), data)
    with atomic_open(os.path.join(root, "summary.md"), "w", encoding="utf-8") as f:
        f.write(markdown + "\n")
    if not quiet:
        print()
        print(text)
        print(f"\nsummaries: {os.path.join(root, 'summary.{csv,json,md}')}"
              + (f", plot: {os.path.join(root, 'fewshot.png')}" if protocol == "fewshot" else ""))
    return data


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    report(argv[0], argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
