r"""Every optimizer from the same start on three classic surfaces, drawn as paths on contours.

Seed 003 (section 11) shows the optimizers on the Beale function and at a saddle point: the
adaptive methods (Adagrad, Adadelta, RMSprop, Adam) head in the right direction at once,
momentum overshoots and comes back, and at a saddle plain SGD hardly moves off the ridge while
the adaptive methods run down the negative slope. This script reproduces those pictures with
fastopt, plus Rosenbrock's banana valley:

- Beale, :math:`f = (1.5 - x + xy)^2 + (2.25 - x + xy^2)^2 + (2.625 - x + xy^3)^2`,
  minimum 0 at (3, 0.5);
- Rosenbrock, :math:`f = (1 - x)^2 + 100 (y - x^2)^2`, minimum 0 at (1, 1) at the end of a
  long curved valley;
- a saddle, :math:`f = x^2 - y^2`, starting a hair off the ridge :math:`y = 0`.

Each optimizer updates one float64 array of two coordinates in place, exactly as it would a
network's weights: ``opt = fo.Adam([p], lr=...); opt.step([grad(p)])``. Learning rates are set
per surface so that each method shows its character (the seed's pictures do the same); they are
in ``SURFACES`` below.

Run ``python examples/trajectories.py --out DIR`` (needs matplotlib) or ``fastopt demo``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

import fastopt as fo

#: label -> (optimizer class, options besides lr). AdamW equals Adam here (no weight decay).
OPTIMIZERS = {
    "SGD": (fo.SGD, {}),
    "Momentum": (fo.SGD, {"momentum": 0.9}),
    "Nesterov": (fo.SGD, {"momentum": 0.9, "nesterov": True}),
    "Adagrad": (fo.Adagrad, {}),
    "Adadelta": (fo.Adadelta, {}),
    "RMSprop": (fo.RMSprop, {}),
    "Adam": (fo.Adam, {}),
    "Adamax": (fo.Adamax, {}),
    "NAdam": (fo.NAdam, {}),
    "RAdam": (fo.RAdam, {}),
}


#: One colour per optimizer (tab10 with its grey swapped for black, which reads on the contours).
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#000000",
          "#bcbd22", "#17becf"]


def beale(x, y):
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def beale_grad(p: np.ndarray) -> np.ndarray:
    x, y = p
    a, b, c = 1.5 - x + x * y, 2.25 - x + x * y**2, 2.625 - x + x * y**3
    return np.array([2 * a * (y - 1) + 2 * b * (y**2 - 1) + 2 * c * (y**3 - 1),
                     2 * a * x + 4 * b * x * y + 6 * c * x * y**2])


def rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def rosenbrock_grad(p: np.ndarray) -> np.ndarray:
    x, y = p
    return np.array([-2 * (1 - x) - 400 * x * (y - x**2), 200 * (y - x**2)])


def saddle(x, y):
    return x**2 - y**2


def saddle_grad(p: np.ndarray) -> np.ndarray:
    x, y = p
    return np.array([2 * x, -2 * y])


@dataclass(frozen=True)
class Surface:
    """A 2-D test function, where to start, how long to run and each optimizer's lr."""

    name: str
    f: Callable
    grad: Callable[[np.ndarray], np.ndarray]
    start: tuple[float, float]
    minimum: tuple[float, float] | None
    xlim: tuple[float, float]
    ylim: tuple[float, float]
    steps: int
    lrs: dict
    log_levels: bool = True


SURFACES = {
    "beale": Surface(
        "Beale", beale, beale_grad, start=(1.0, 1.5), minimum=(3.0, 0.5), xlim=(-0.5, 4.0),
        ylim=(-1.5, 2.0), steps=400,
        lrs={"SGD": 3e-3, "Momentum": 1e-3, "Nesterov": 1e-3, "Adagrad": 0.3, "Adadelta": 1.0,
             "RMSprop": 0.01, "Adam": 0.03, "Adamax": 0.1, "NAdam": 0.03, "RAdam": 3e-3}),
    "rosenbrock": Surface(
        "Rosenbrock", rosenbrock, rosenbrock_grad, start=(-1.5, 2.0), minimum=(1.0, 1.0),
        xlim=(-2.0, 2.0), ylim=(-1.0, 3.0), steps=800,
        lrs={"SGD": 1e-3, "Momentum": 1e-3, "Nesterov": 1e-3, "Adagrad": 0.3, "Adadelta": 1.0,
             "RMSprop": 0.01, "Adam": 0.1, "Adamax": 0.1, "NAdam": 0.03, "RAdam": 3e-3}),
    "saddle": Surface(
        "Saddle", saddle, saddle_grad, start=(1.0, 1e-3), minimum=None, xlim=(-1.5, 1.5),
        ylim=(-1.5, 1.5), steps=150, log_levels=False,
        lrs={"SGD": 0.02, "Momentum": 0.02, "Nesterov": 0.02, "Adagrad": 0.02, "Adadelta": 1.0,
             "RMSprop": 0.02, "Adam": 0.02, "Adamax": 0.02, "NAdam": 0.02, "RAdam": 0.02}),
}


def trajectory(surface: Surface, label: str, steps: int | None = None) -> np.ndarray:
    """The path of one optimizer, ``(k + 1, 2)``: the start and the point after each step.

    Stops early if the point leaves a box three times the plot's size (the saddle has no
    bottom) or the gradient stops being finite.
    """
    cls, options = OPTIMIZERS[label]
    p = np.array(surface.start, dtype=np.float64)
    opt = cls([p], lr=surface.lrs[label], **options)
    (x0, x1), (y0, y1) = surface.xlim, surface.ylim
    limit = 3 * max(x1 - x0, y1 - y0)
    path = [p.copy()]
    for _ in range(surface.steps if steps is None else steps):
        g = surface.grad(p)
        if not np.all(np.isfinite(g)):
            break
        opt.step([g])
        path.append(p.copy())
        if np.abs(p).max() > limit:
            break
    return np.array(path)


def run(surface: Surface, steps: int | None = None) -> dict[str, np.ndarray]:
    """Every optimizer's path on ``surface``."""
    return {label: trajectory(surface, label, steps) for label in OPTIMIZERS}


def clip_to_box(path: np.ndarray, xlim: tuple[float, float], ylim: tuple[float, float]) -> np.ndarray:
    """The part of ``path`` inside the box: its points up to the first one outside, then the
    point where the segment to it crosses the box's edge (so a path that runs off, as on the
    saddle, ends at the frame instead of leaving it)."""
    lo = np.array([xlim[0], ylim[0]])
    hi = np.array([xlim[1], ylim[1]])
    inside = np.all((path >= lo) & (path <= hi), axis=1)
    if inside.all() or not inside[0]:
        return path if inside.all() else path[:1]
    k = int(np.argmin(inside))  # the first point outside
    a, b = path[k - 1], path[k]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_lo, t_hi = (lo - a) / (b - a), (hi - a) / (b - a)
    ts = [t for t in np.concatenate([t_lo, t_hi]) if np.isfinite(t) and 0 <= t <= 1]
    t = min(ts) if ts else 0.0
    edge = np.clip(a + t * (b - a), lo, hi)
    return np.vstack([path[:k], edge])


def draw(ax, surface: Surface, paths: dict[str, np.ndarray]) -> dict:
    """Contours of ``surface`` and the paths on one matplotlib Axes, each clipped to the panel
    (:func:`clip_to_box`); returns each optimizer's ``(line, end marker, drawn path)`` so an
    animation can move them."""
    from matplotlib.colors import LogNorm

    xs = np.linspace(*surface.xlim, 300)
    ys = np.linspace(*surface.ylim, 300)
    X, Y = np.meshgrid(xs, ys)
    Z = surface.f(X, Y)
    if surface.log_levels:
        levels = np.logspace(np.log10(max(Z.min(), 1e-3)), np.log10(Z.max()), 30)
        norm = LogNorm(levels[0], levels[-1])
    else:
        levels = np.linspace(Z.min(), Z.max(), 30)
        norm = None
    ax.contourf(X, Y, Z, levels=levels, norm=norm, cmap="Blues_r", alpha=0.35, extend="both")
    ax.contour(X, Y, Z, levels=levels, norm=norm, colors="#6a7f99", linewidths=0.35, alpha=0.8)
    artists = {}
    for color, (label, path) in zip(COLORS, paths.items()):
        path = clip_to_box(path, surface.xlim, surface.ylim)
        (line,) = ax.plot(path[:, 0], path[:, 1], color=color, linewidth=1.8, label=label, alpha=0.9)
        (end,) = ax.plot(path[-1, 0], path[-1, 1], "o", color=color, markersize=5,
                         markeredgecolor="white", markeredgewidth=0.6)
        artists[label] = (line, end, path)
    ax.plot(*surface.start, "o", color="white", markeredgecolor="black", markersize=9, zorder=5)
    if surface.minimum is not None:
        ax.plot(*surface.minimum, "*", color="gold", markeredgecolor="black", markersize=16)
    ax.set_xlim(surface.xlim)
    ax.set_ylim(surface.ylim)
    ax.set_title(f"{surface.name}: {max(len(p) for p in paths.values()) - 1} steps from {surface.start}")
    ax.set_box_aspect(1)
    return artists


def figure(small: bool = False, size: tuple[float, float] = (18, 6.6), fontsize: float = 11):
    """All three surfaces on one new Figure; returns ``(fig, panels)``, ``panels`` holding each
    surface's paths and artists (what :func:`animate` moves)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(SURFACES))
    panels = []
    for ax, surface in zip(axes, SURFACES.values()):
        paths = run(surface, surface.steps // 4 if small else None)
        panels.append((paths, draw(ax, surface, paths)))
        ax.title.set_fontsize(fontsize)
        ax.tick_params(labelsize=fontsize - 2)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(OPTIMIZERS) // 2, fontsize=fontsize)
    fig.suptitle("fastopt's optimizers from the same start (white dot); the star marks the minimum",
                 fontsize=fontsize + 2)
    return fig, panels


def main(out_dir: str = ".", small: bool = False, gif: bool = False, frames: int = 24) -> list[str]:
    """Draw all three surfaces into ``out_dir/trajectories.png`` (and, with ``gif``, an
    animation of the paths growing step by step, ``trajectories.gif``: ``frames`` frames on a
    smaller figure with a 64-colour palette, under 1 MB); return the paths written.

    ``small`` runs a quarter of the steps (what ``fastopt demo`` and the tests use).
    """
    fig, _ = figure(small)
    os.makedirs(out_dir, exist_ok=True)
    written = [os.path.join(out_dir, "trajectories.png")]
    fig.savefig(written[0], dpi=100)
    if gif:
        written.append(os.path.join(out_dir, "trajectories.gif"))
        small_fig, panels = figure(small, size=(12, 5.2), fontsize=11)
        animate(small_fig, panels, written[1], frames)
    return written


def animate(fig, panels: list, path: str, frames: int, dpi: int = 72, colors: int = 64) -> None:
    """Save ``fig`` as a GIF whose paths grow from the start to their last step: ``frames``
    frames rendered at ``dpi``, each reduced to one shared ``colors``-colour palette (the
    contours' shades plus each path's colour), the last frame held for 2 s."""
    from PIL import Image

    images = []
    for frame in range(frames):
        for paths, artists in panels:
            steps = max(len(p) for p in paths.values()) - 1
            k = round(steps * frame / max(frames - 1, 1))
            for line, end, drawn in artists.values():
                shown = drawn[: k + 1]  # the clipped path: a path that ran off stops at the frame
                line.set_data(shown[:, 0], shown[:, 1])
                end.set_data(shown[-1:, 0], shown[-1:, 1])
        fig.set_dpi(dpi)
        fig.canvas.draw()
        images.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
    # one palette for all frames: the contours' shades (from the first frame, before the paths
    # cover them), then every path's colour and the markers' exactly
    fixed = [tuple(int(c[i:i + 2], 16) for i in (1, 3, 5)) for c in COLORS] + [(255, 255, 255), (0, 0, 0),
                                                                            (255, 215, 0)]
    shades = images[0].quantize(colors=colors - len(fixed), method=Image.Quantize.MEDIANCUT)
    rgb = list(shades.getpalette()[: 3 * (colors - len(fixed))]) + [v for c in fixed for v in c]
    palette = Image.new("P", (1, 1))
    palette.putpalette(rgb + [0] * (768 - len(rgb)))
    frames_p = [im.quantize(palette=palette, dither=Image.Dither.NONE) for im in images]
    durations = [120] * (len(frames_p) - 1) + [2000]
    frames_p[0].save(path, save_all=True, append_images=frames_p[1:], duration=durations, loop=0, optimize=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="directory for trajectories.png")
    parser.add_argument("--small", action="store_true", help="a quarter of the steps")
    parser.add_argument("--gif", action="store_true", help="also write trajectories.gif (an animation)")
    args = parser.parse_args()
    for written in main(args.out, args.small, args.gif):
        print("wrote", written)
