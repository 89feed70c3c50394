"""Write results: JSON (strict: non-finite numbers become strings), a PNG plot, and the compact table."""

from __future__ import annotations

import json
import math
from pathlib import Path

COLUMNS = ("case", "shape", "ours", "ms", "baseline", "ms", "t ours/base", "MiB ours", "MiB base",
           "mem ours/base", "max err", "goal")


def _finite(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "inf" / "nan": valid JSON, and visibly wrong
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(result: dict, path: Path) -> None:
    path.write_text(json.dumps(_finite(result), indent=1, allow_nan=False) + "\n")


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _goal(comp: dict) -> str:
    if comp.get("goal_met") is None:
        return "-" if comp["within_tolerance"] else "WRONG"
    return "met" if comp["goal_met"] else "MISSED"


def table_rows(result: dict) -> list[tuple[str, ...]]:
    rows = []
    for case in result["cases"]:
        impls = case["impls"]
        for comp in case["comparisons"]:
            o, b = impls[comp["ours"]], impls[comp["baseline"]]
            err = comp["max_rel_err"]
            rows.append((case["case"], case["shape"], comp["ours"], _num(o.get("time_ms"), ".3g"), comp["baseline"],
                         _num(b.get("time_ms"), ".3g"), _num(comp.get("time_ratio"), ".2f"),
                         _num(o.get("peak_mib"), ".4g"), _num(b.get("peak_mib"), ".4g"),
                         _num(comp.get("memory_ratio"), ".3f"), _num(err, ".1e"), _goal(comp)))
        # Contenders that did not make it into a comparison still get a line saying why.
        compared = {c["ours"] for c in case["comparisons"]} | {c["baseline"] for c in case["comparisons"]}
        for label, entry in impls.items():
            if label not in compared or entry["status"] != "ok":
                why = entry.get("reason") or "no counterpart to compare with"
                rows.append((case["case"], case["shape"], label, entry["status"].upper(), why[:90]))
        if not impls and case.get("status") != "ok":
            rows.append((case["case"], case["shape"], "-", case.get("status", "?").upper(),
                         (case.get("reason") or "")[:90]))
    return rows


def format_table(result: dict) -> str:
    rows = table_rows(result)
    full = [r for r in rows if len(r) == len(COLUMNS)]
    widths = [max([len(c)] + [len(r[i]) for r in full]) for i, c in enumerate(COLUMNS)]
    def line(cells):
        if len(cells) != len(COLUMNS):  # a status line: first columns aligned, the reason runs on
            head = "  ".join(c.ljust(w) for c, w in zip(cells[:3], widths))
            return f"{head}  {'  '.join(cells[3:])}"
        return "  ".join(c.rjust(w) if i >= 3 and i != 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    env = result.get("env", {})
    dev = env.get("device", {})
    title = (f"{result['family']} on {dev.get('name', result['device_type'])}"
             f"{' (quick)' if result.get('quick') else ''}"
             f"{'' if result.get('complete', True) else ' (INCOMPLETE: the run stopped early)'}"
             "; times = median fwd+bwd, ratios ours/baseline "
             "(< 1 is better); err = max relative error vs baseline")
    legend = ("goal: met / MISSED = the plan's time and memory ratio targets (JSON 'goal') with the error "
              "within tolerance; WRONG = error above the case's tolerance")
    return "\n".join([title, line(COLUMNS), *(line(r) for r in rows), legend])


def plot(result: dict, path: Path) -> str | None:
    """Bars of median time and peak memory per contender, one group per case. Returns None on success,
    else why no plot was made (matplotlib is optional on the benchmark machine)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        return f"matplotlib unavailable: {exc}"
    groups = [c for c in result["cases"] if any(i.get("time_ms") for i in c["impls"].values())]
    measured = {k for c in groups for k, i in c["impls"].items() if i.get("time_ms")}
    labels = sorted(measured, key=lambda k: (not k.startswith("ours"), k))  # ours first, then baselines
    present = [[k for k in labels if c["impls"].get(k, {}).get("time_ms")] for c in groups]  # bars per group
    fig, axes = plt.subplots(1, 2, figsize=(15, 1.5 + 0.4 * max(1, sum(len(p) for p in present))),
                             squeeze=False)
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    bar = 0.8 / max([1] + [len(p) for p in present])
    for ax, key, unit, fmt in ((axes[0][0], "time_ms", "median time fwd+bwd (ms)", "{:.3g} ms"),
                               (axes[0][1], "peak_mib", "peak memory above inputs (MiB)", "{:.4g} MiB")):
        points = [(g + j * bar, case["impls"][label][key], label) for g, case in enumerate(groups)
                  for j, label in enumerate(present[g]) if case["impls"][label].get(key) is not None]
        positive = [v for _, v, _ in points if v > 0] or [1.0]
        left = min(positive) / 3
        ax.set_xscale("log")
        ax.set_xlim(left, max(positive) * 8)  # room on the right for the value labels
        for y, value, label in points:
            if value > 0:
                ax.barh(y, value, height=bar, color=colors[label])
            ax.text(max(value, left), y, " " + fmt.format(value), va="center", fontsize=7)
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks([g + (len(present[g]) - 1) * bar / 2 for g in range(len(groups))])
        ax.set_yticklabels([f"{c['case']}\n{c['shape']}" for c in groups], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(unit + ", log scale")
        ax.grid(axis="x", alpha=0.3)
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in labels], labels, loc="lower center",
               ncol=max(1, len(labels)), fontsize=8)
    dev = result.get("env", {}).get("device", {}).get("name", result["device_type"])
    fig.suptitle(f"mgpt {result['family']} benchmarks on {dev}{' (quick)' if result.get('quick') else ''}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
