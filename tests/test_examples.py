"""The examples run, at small size, and show what they claim: the trajectories' gradients are
right and the optimizers behave as seed 003 describes; the MLP's backward pass is right and
its training lowers the loss. The pictures are written and are PNGs."""

import math

import numpy as np
import pytest

from fastopt.examples import trajectories as T

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == PNG_MAGIC, f"{path} is not a PNG"


# -- trajectories ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(T.SURFACES))
def test_surface_gradient_matches_finite_differences(name):
    surface = T.SURFACES[name]
    rng = np.random.default_rng(1)
    h = 1e-6
    for _ in range(5):
        p = np.array([rng.uniform(*surface.xlim), rng.uniform(*surface.ylim)])
        numeric = [(surface.f(*(p + h * e)) - surface.f(*(p - h * e))) / (2 * h) for e in np.eye(2)]
        np.testing.assert_allclose(surface.grad(p), numeric, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def paths():
    return {name: T.run(surface) for name, surface in T.SURFACES.items()}


def test_every_optimizer_descends_beale_and_rosenbrock(paths):
    for name in ("beale", "rosenbrock"):
        surface = T.SURFACES[name]
        start = surface.f(*surface.start)
        for label, path in paths[name].items():
            assert len(path) == surface.steps + 1, f"{label} stopped early on {name}"
            assert surface.f(*path[-1]) < start / 2, f"{label} did not descend on {name}"


def test_adam_reaches_the_end_of_rosenbrocks_valley(paths):
    x, y = paths["rosenbrock"]["Adam"][-1]
    assert math.hypot(x - 1, y - 1) < 0.05
    assert T.rosenbrock(x, y) < 1e-3


def test_momentum_overtakes_plain_sgd_on_beale(paths):
    beale = T.SURFACES["beale"]
    final = {label: beale.f(*path[-1]) for label, path in paths["beale"].items()}
    assert final["Momentum"] < final["SGD"] / 10
    assert final["Nesterov"] < final["SGD"] / 10


def test_adaptive_methods_escape_the_saddle_and_sgd_does_not(paths):
    """Seed 003: at a saddle, SGD hardly breaks the symmetry; RMSprop, Adadelta (and Adam) run
    down the negative slope."""
    ends = {label: path[-1] for label, path in paths["saddle"].items()}
    assert abs(ends["SGD"][1]) < 0.5
    for label in ("RMSprop", "Adadelta", "Adam"):
        assert abs(ends[label][1]) > 1.0, label


def test_trajectories_picture(tmp_path):
    pytest.importorskip("matplotlib")
    written = T.main(out_dir=str(tmp_path), small=True)
    assert written == [str(tmp_path / "trajectories.png")]
    assert_png(written[0])


def test_trajectories_animation(tmp_path):
    pytest.importorskip("matplotlib")
    image = pytest.importorskip("PIL.Image")
    written = T.main(out_dir=str(tmp_path), small=True, gif=True, frames=3)
    assert written[1] == str(tmp_path / "trajectories.gif")
    with image.open(written[1]) as gif:
        assert gif.format == "GIF" and gif.n_frames == 3


def test_clip_to_box_stops_a_path_at_the_frame():
    path = np.array([[0.0, 0.0], [0.5, 0.5], [1.0, 2.0], [0.2, 0.2]])  # leaves through y = 1, comes back
    clipped = T.clip_to_box(path, (-1, 1), (-1, 1))
    np.testing.assert_allclose(clipped, [[0, 0], [0.5, 0.5], [2 / 3, 1.0]])
    inside = np.array([[0.0, 0.0], [0.9, -0.9]])
    np.testing.assert_array_equal(T.clip_to_box(inside, (-1, 1), (-1, 1)), inside)


def test_every_drawn_path_stays_inside_its_panel():
    """The saddle's adaptive paths run off to infinity; what is drawn ends at the frame."""
    pytest.importorskip("matplotlib")
    fig, panels = T.figure()
    for ax, (paths, artists) in zip(fig.axes, panels):
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        for label, (line, end, drawn) in artists.items():
            for artist in (line, end):
                xs, ys = np.asarray(artist.get_xdata()), np.asarray(artist.get_ydata())
                assert np.all((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)), (ax.get_title(), label)
            assert len(drawn) <= len(paths[label])


def test_trajectories_animation_is_small(tmp_path):
    pytest.importorskip("matplotlib")
    image = pytest.importorskip("PIL.Image")
    path = T.main(out_dir=str(tmp_path), gif=True)[1]
    import os

    assert os.path.getsize(path) < 1 << 20
    with image.open(path) as gif:
        assert gif.n_frames == 24 and gif.size[0] >= 800  # legible: not shrunk to a thumbnail


# -- the digits MLP ---------------------------------------------------------------------------
def test_mlp_gradients_match_finite_differences():
    from fastopt.examples.mlp_digits import MLP

    rng = np.random.default_rng(0)
    model = MLP(n_in=5, n_hidden=4, n_out=3, seed=0, dtype=np.float64)
    X = rng.standard_normal((7, 5))
    y = rng.integers(0, 3, size=7)
    grads = model.zeros_like()
    loss = model.loss_and_grads(X, y, grads)
    assert loss == pytest.approx(model.loss(X, y), rel=1e-12)
    h = 1e-6
    for p, g in zip(model.params, grads):
        numeric = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up = model.loss(X, y)
            p[i] = old - h
            down = model.loss(X, y)
            p[i] = old
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-8)


@pytest.fixture(scope="module")
def mlp_results():
    pytest.importorskip("sklearn")
    from fastopt.examples import mlp_digits

    return mlp_digits.run(epochs=3, subset=800)


def test_mlp_training_lowers_the_loss(mlp_results):
    for key in ("variants", "optimizers"):
        for label, r in mlp_results[key].items():
            loss = r["loss"]
            assert len(loss) == 4 and np.all(np.isfinite(loss)), label
            assert loss[-1] < 0.75 * loss[0], f"{label}: {loss}"
            if label.startswith("batch"):  # full-batch GD: no noise, every epoch is lower
                assert np.all(np.diff(loss) < 0), f"{label}: {loss}"
    adam = next(r for label, r in mlp_results["optimizers"].items() if label.startswith("Adam "))
    assert adam["test_accuracy"] > 0.85


def test_mlp_gradient_norms_are_recorded_and_clipping_engages(mlp_results):
    from fastopt.examples.mlp_digits import MAX_NORM

    for key in ("variants", "optimizers"):
        for label, r in mlp_results[key].items():
            norms = r["grad_norms"]
            assert len(norms) == r["steps"] and np.all(np.isfinite(norms)) and np.all(norms > 0), label
    stochastic = next(r for label, r in mlp_results["variants"].items() if label.startswith("stochastic"))
    assert stochastic["grad_norms"].max() > MAX_NORM  # single examples give large gradients


def test_more_updates_per_epoch_learn_more_per_epoch(mlp_results):
    """Seed 003: stochastic GD makes one update per example, batch GD one per epoch; after one
    epoch the stochastic run is far ahead."""
    first = {label.split()[0]: r["loss"][1] for label, r in mlp_results["variants"].items()}
    assert first["stochastic"] < first["mini-batch"] < first["batch"]


def test_mlp_picture(mlp_results, tmp_path):
    pytest.importorskip("matplotlib")
    from fastopt.examples import mlp_digits

    path = tmp_path / "mlp.png"
    mlp_digits.plot(mlp_results, str(path))
    assert_png(path)
