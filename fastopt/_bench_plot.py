"""The picture of a ``fastopt bench`` report (``--plot FILE.png``; needs matplotlib).

One panel per size: for every optimizer, the bytes per second its step moves (the bytes a fused
step must read and write, over the step's time) for fastopt, torch and NumPy, and, as a dashed
tick across that optimizer's bars, the same-traffic probe timed with it (its roofline). Each
label is fastopt's bar over that tick, the table's ``roofline`` column: the same numerator and
the same denominator as drawn (``noisy`` where the table says so). Uses matplotlib's object API
(``Figure``), so it never touches the user's pyplot backend.
"""

from __future__ import annotations

from .bench import Report, _size

COLORS = {"fastopt": "#1f77b4", "torch": "#ff7f0e", "NumPy": "#7f7f7f"}
ROOFLINE_LABEL = "same-traffic loop (roofline)"


def figure(report: Report):
    """The report drawn on a new matplotlib ``Figure`` (not saved)."""
    from matplotlib.figure import Figure

    sizes = list(dict.fromkeys(r.size for r in report.rows))
    rules = list(dict.fromkeys(r.rule for r in report.rows))
    by_key = {(r.rule, r.size): r for r in report.rows}
    series = [("fastopt", lambda r: r.fastopt), ("torch", lambda r: r.torch), ("NumPy", lambda r: r.numpy)]
    series = [(name, get) for name, get in series if any(get(r) is not None for r in report.rows)]

    height = 1.2 + 0.42 * len(rules) * max(1, len(series)) / 2
    fig = Figure(figsize=(4.8 * len(sizes) + 1.2, height), layout="constrained")
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    bar = 0.8 / len(series)
    for ax, n in zip(axes, sizes):
        for k, (name, get) in enumerate(series):
            ys, widths = [], []
            for i, rule in enumerate(rules):
                row = by_key.get((rule, n))
                seconds = None if row is None else get(row)
                if seconds is not None:
                    ys.append(i + (k - (len(series) - 1) / 2) * bar)
                    widths.append(row.bytes_per_param * n / seconds / 1e9)
            ax.barh(ys, widths, height=bar * 0.92, color=COLORS[name], label=name)
        tops = []
        for i, rule in enumerate(rules):
            row = by_key.get((rule, n))
            if row is None:
                continue
            probe = row.probe_gbps
            tops.append(probe)
            ax.plot([probe, probe], [i - 0.45, i + 0.45], color="black", linestyle="--", linewidth=1.2,
                    label=ROOFLINE_LABEL if not ax.get_legend_handles_labels()[1].count(ROOFLINE_LABEL) else None)
            text = "noisy" if row.noisy else f"{row.gbps / probe:.0%}"
            ax.annotate(text, (row.gbps, i - (len(series) - 1) / 2 * bar), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8, color=COLORS["fastopt"])
        where = "" if not by_key or all(r.fits_llc is None for r in report.rows if r.size == n) else (
            " (in LLC)" if all(r.fits_llc for r in report.rows if r.size == n) else " (DRAM)")
        ax.set_title(f"n = {_size(n)} parameters{where}", fontsize=11)
        ax.set_xlabel("effective GB/s: a fused step's bytes / step time (higher is better)")
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(0, 1.15 * max(tops + [p.get_width() for p in ax.patches] + [1e-9]))
    axes[0].set_yticks(range(len(rules)), rules)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
    m = report.machine
    fig.suptitle(f"fastopt bench: {m['cpu']}, {report.threads} threads, {report.dtype} "
                 "(labels: fastopt's bar over its row's dashed same-traffic tick)", fontsize=11)
    return fig


def plot_report(report: Report, path: str) -> None:
    """Draw ``report`` and save it to ``path`` (any format matplotlib knows by extension)."""
    figure(report).savefig(path, dpi=120)
