"""The picture of a ``fastopt bench`` report (``--plot FILE.png``; needs matplotlib).

One panel per size: for every optimizer, the bytes per second its step moves (the bytes a fused
step must read and write, over the step's time) for fastopt, torch and NumPy, against the
in-place ``x += a * y`` bandwidth measured on the same memory footprint (the dashed line, the roofline).
Uses matplotlib's object API (``Figure``), so it never touches the user's pyplot backend.
"""

from __future__ import annotations

from .bench import Report, _size

COLORS = {"fastopt": "#1f77b4", "torch": "#ff7f0e", "NumPy": "#7f7f7f"}


def plot_report(report: Report, path: str) -> None:
    """Draw ``report`` and save it to ``path`` (any format matplotlib knows by extension)."""
    from matplotlib.figure import Figure

    sizes = list(report.bandwidth)
    rules = list(dict.fromkeys(r.rule for r in report.rows))
    by_key = {(r.rule, r.size): r for r in report.rows}
    series = [("fastopt", lambda r: r.fastopt), ("torch", lambda r: r.torch), ("NumPy", lambda r: r.numpy)]
    series = [(name, get) for name, get in series if any(get(r) is not None for r in report.rows)]

    height = 1.2 + 0.42 * len(rules) * max(1, len(series)) / 2
    fig = Figure(figsize=(4.8 * len(sizes) + 1.2, height), layout="constrained")
    axes = fig.subplots(1, len(sizes), sharey=True, squeeze=False)[0]
    bar = 0.8 / len(series)
    for ax, n in zip(axes, sizes):
        bandwidth = report.bandwidth[n] / 1e9
        for k, (name, get) in enumerate(series):
            ys, widths = [], []
            for i, rule in enumerate(rules):
                row = by_key.get((rule, n))
                seconds = None if row is None else get(row)
                if seconds is not None:
                    ys.append(i + (k - (len(series) - 1) / 2) * bar)
                    widths.append(row.bytes_per_param * n / seconds / 1e9)
            ax.barh(ys, widths, height=bar * 0.92, color=COLORS[name], label=name)
        ax.axvline(bandwidth, color="black", linestyle="--", linewidth=1.2,
                   label="x += a*y (roofline)")
        ax.set_title(f"n = {_size(n)} parameters", fontsize=11)
        ax.set_xlabel("effective GB/s: a fused step's bytes / step time (higher is better)")
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlim(0, 1.15 * max([bandwidth] + [p.get_width() for p in ax.patches]))
        for i, rule in enumerate(rules):
            row = by_key.get((rule, n))
            if row is not None:
                ax.annotate(f"{row.roofline:.0%}", (row.gbps, i - (len(series) - 1) / 2 * bar),
                            xytext=(3, 0), textcoords="offset points", va="center", fontsize=8,
                            color=COLORS["fastopt"])
    axes[0].set_yticks(range(len(rules)), rules)
    axes[0].invert_yaxis()
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), fontsize=9)
    m = report.machine
    fig.suptitle(f"fastopt bench: {m['cpu']}, {report.threads} threads, {report.dtype} "
                 "(labels: fastopt's fraction of the roofline)", fontsize=11)
    fig.savefig(path, dpi=120)
