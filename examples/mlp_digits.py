r"""A NumPy multilayer perceptron on scikit-learn's digits, trained with fastopt.

The model is 64 -> 64 (tanh) -> 10 (softmax), written in NumPy: forward, cross-entropy loss
and backward by hand, the gradients written into preallocated arrays. fastopt only sees arrays
and their gradients, the way it sits in any hand-written trainer:

    params = [W1, b1, W2, b2]; grads = [gW1, gb1, gW2, gb2]
    schedule = fo.schedules.warmup_cosine(0.03, warmup_steps=64, total_steps=1290)
    opt = fo.Adam(params, lr=schedule, clip_grad_norm=5.0)   # lr: a float or any step -> lr
    for xb, yb in batches:
        loss = model.loss_and_grads(xb, yb, grads)
        opt.step(grads)        # clipped to global norm 5 inside the fused pass, in place

Two comparisons, both from seed 003:

1. batch, mini-batch and stochastic gradient descent (the whole training set, 32 examples,
   one example per update) with plain SGD and a warm-up + cosine learning-rate schedule, for
   the same number of epochs: batch GD makes one smooth update per epoch, stochastic GD
   hundreds of noisy ones;
2. the optimizers on mini-batches of 32, each at a learning rate that suits it.

The training loss over the whole training set is recorded after every epoch (and before the
first) and plotted; test accuracy goes in the legend. The data set ships with scikit-learn
(1797 8x8 images, no download): ``pip install 'fastopt[examples]'``.

Run ``python examples/mlp_digits.py --out DIR`` or ``fastopt demo``.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

import numpy as np

import fastopt as fo

#: Gradients are clipped to this global L2 norm (fastopt's fused ``clip_grad_norm``).
MAX_NORM = 5.0


def load_digits(seed: int = 0, test_fraction: float = 0.25, dtype=np.float32):
    """scikit-learn's digits, pixels scaled to [0, 1], split into train and test at random."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    X = (data.data / 16.0).astype(dtype)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return X[train], y[train], X[test], y[test]


class MLP:
    """``x -> tanh(x W1 + b1) W2 + b2 -> softmax``; parameters and gradients are lists of arrays."""

    def __init__(self, n_in: int = 64, n_hidden: int = 64, n_out: int = 10, seed: int = 0, dtype=np.float32):
        rng = np.random.default_rng(seed)
        self.params = [
            (rng.standard_normal((n_in, n_hidden)) / math.sqrt(n_in)).astype(dtype),
            np.zeros(n_hidden, dtype),
            (rng.standard_normal((n_hidden, n_out)) / math.sqrt(n_hidden)).astype(dtype),
            np.zeros(n_out, dtype),
        ]

    def zeros_like(self) -> list[np.ndarray]:
        return [np.zeros_like(p) for p in self.params]

    def logits(self, X: np.ndarray) -> np.ndarray:
        W1, b1, W2, b2 = self.params
        return np.tanh(X @ W1 + b1) @ W2 + b2

    def loss(self, X: np.ndarray, y: np.ndarray) -> float:
        z = self.logits(X)
        z = z - z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(self.logits(X).argmax(axis=1) == y))

    def loss_and_grads(self, X: np.ndarray, y: np.ndarray, grads: list[np.ndarray]) -> float:
        """Mean cross-entropy of the batch; its gradients are written into ``grads``."""
        W1, b1, W2, b2 = self.params
        gW1, gb1, gW2, gb2 = grads
        h = np.tanh(X @ W1 + b1)
        z = h @ W2 + b2
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        total = e.sum(axis=1, keepdims=True)
        rows = np.arange(len(y))
        loss = float(np.mean(np.log(total[:, 0]) - z[rows, y]))  # log-sum-exp: no log(0)
        prob = e / total
        dz = prob
        dz[rows, y] -= 1
        dz /= len(y)
        np.matmul(h.T, dz, out=gW2)
        np.sum(dz, axis=0, out=gb2)
        dh = (dz @ W2.T) * (1 - h * h)
        np.matmul(X.T, dh, out=gW1)
        np.sum(dh, axis=0, out=gb1)
        return loss


def train(make_optimizer: Callable, data, *, batch_size: int, epochs: int, lr: float, seed: int = 0,
          max_norm: float = MAX_NORM) -> dict:
    """Train a fresh MLP; return the training loss before and after each epoch, the test
    accuracy and the gradient norm of every step (before clipping).

    ``make_optimizer(params, lr, **options)`` builds the optimizer, ``lr`` being a warm-up +
    cosine schedule peaking at ``lr`` and the options ``clip_grad_norm=max_norm``.
    """
    X, y, X_test, y_test = data
    model = MLP(X.shape[1], seed=seed, dtype=X.dtype)
    grads = model.zeros_like()
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = steps_per_epoch * epochs
    schedule = fo.schedules.warmup_cosine(lr, warmup_steps=total // 20, total_steps=total)
    opt = make_optimizer(model.params, schedule, clip_grad_norm=max_norm)
    rng = np.random.default_rng(seed + 1)
    losses, norms = [model.loss(X, y)], []
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            batch = order[start : start + batch_size]
            model.loss_and_grads(X[batch], y[batch], grads)
            opt.step(grads)  # clipping happens inside the fused update; grads are not modified
            norms.append(opt.last_grad_norm)
        losses.append(model.loss(X, y))
    return {"loss": np.array(losses), "test_accuracy": model.accuracy(X_test, y_test), "steps": total,
            "grad_norms": np.array(norms)}


# Peak learning rates: for each entry, the best test accuracy of four rates a factor 3 apart
# around the usual default, after 30 epochs with this schedule and clipping.

#: Seed 003's three variants with plain SGD: (examples per update or None for all, peak lr).
GD_VARIANTS = {
    "batch": (None, 1.5),
    "mini-batch": (32, 0.6),
    "stochastic": (1, 0.06),
}

#: label -> (factory, peak lr) for the optimizer comparison on mini-batches of 32.
OPTIMIZERS = {
    "SGD": (lambda p, lr, **kw: fo.SGD(p, lr=lr, **kw), 0.6),
    "SGD momentum": (lambda p, lr, **kw: fo.SGD(p, lr=lr, momentum=0.9, **kw), 0.15),
    "SGD Nesterov": (lambda p, lr, **kw: fo.SGD(p, lr=lr, momentum=0.9, nesterov=True, **kw), 0.15),
    "Adagrad": (lambda p, lr, **kw: fo.Adagrad(p, lr=lr, **kw), 0.15),
    "Adadelta": (lambda p, lr, **kw: fo.Adadelta(p, lr=lr, **kw), 10.0),
    "RMSprop": (lambda p, lr, **kw: fo.RMSprop(p, lr=lr, **kw), 0.02),
    "Adam": (lambda p, lr, **kw: fo.Adam(p, lr=lr, **kw), 0.03),
    "AdamW": (lambda p, lr, **kw: fo.AdamW(p, lr=lr, weight_decay=1e-2, **kw), 0.03),
    "Adamax": (lambda p, lr, **kw: fo.Adamax(p, lr=lr, **kw), 0.06),
    "NAdam": (lambda p, lr, **kw: fo.NAdam(p, lr=lr, **kw), 0.03),
    "RAdam": (lambda p, lr, **kw: fo.RAdam(p, lr=lr, **kw), 0.03),
}


def run(epochs: int = 30, seed: int = 0, subset: int | None = None) -> dict:
    """Both comparisons; ``subset`` keeps only that many training examples (for quick runs)."""
    X, y, X_test, y_test = load_digits(seed)
    if subset is not None:
        X, y = X[:subset], y[:subset]
    data = (X, y, X_test, y_test)
    variants = {}
    for name, (batch_size, lr) in GD_VARIANTS.items():
        batch_size = batch_size or len(y)
        variants[f"{name} GD ({batch_size} per step, lr {lr:g})"] = train(
            lambda p, s, **kw: fo.SGD(p, lr=s, **kw), data, batch_size=batch_size, epochs=epochs, lr=lr,
            seed=seed)
    optimizers = {f"{label} (lr {lr:g})": train(factory, data, batch_size=32, epochs=epochs, lr=lr, seed=seed)
                  for label, (factory, lr) in OPTIMIZERS.items()}
    return {"variants": variants, "optimizers": optimizers, "n_train": len(y)}


def plot(results: dict, path: str) -> None:
    """Loss curves of both comparisons, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 6), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#000000",
              "#bcbd22", "#17becf", "#7f7f7f"]
    for ax, key, title in ((left, "variants", "Batch vs mini-batch vs stochastic GD (plain SGD)"),
                           (right, "optimizers", "Optimizers, mini-batches of 32")):
        for color, (label, r) in zip(colors, results[key].items()):
            ax.plot(r["loss"], color=color, linewidth=1.8, marker="o" if len(r["loss"]) < 12 else None,
                    markersize=3, label=f"{label}: test acc. {r['test_accuracy']:.1%}, {r['steps']} steps")
        ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8.5)
    left.set_ylabel("training loss (cross-entropy, whole training set)")
    fig.suptitle(f"NumPy MLP 64-64-10 on scikit-learn digits ({results['n_train']} training images), "
                 "fastopt optimizers, warm-up + cosine schedule, gradient clipping at norm 5", fontsize=12)
    fig.savefig(path, dpi=100)


def main(out_dir: str = ".", small: bool = False) -> list[str]:
    """Run both comparisons and write ``out_dir/mlp_digits.png``; return the paths written.

    ``small`` trains for 5 epochs instead of 30 (what ``fastopt demo`` and the tests use).
    """
    results = run(epochs=5 if small else 30)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "mlp_digits.png")
    plot(results, path)
    return [path]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=".", help="directory for mlp_digits.png")
    parser.add_argument("--small", action="store_true", help="5 epochs instead of 30")
    args = parser.parse_args()
    for written in main(args.out, args.small):
        print("wrote", written)
