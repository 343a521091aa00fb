r"""The NumPy MLP of ``mlp_digits.py``, trained data-parallel over MPI with ZeRO-1 sharded Adam.

Launch (``pip install 'fastopt[mpi,examples]'``; the environment keeps MPICH on shared memory
and loopback, see docs/distributed.md)::

    MPIR_CVAR_CH4_NETMOD=ucx UCX_TLS=self,sm UCX_NET_DEVICES=lo HYDRA_LAUNCHER=fork HYDRA_IFACE=lo \
        mpiexec -n 2 python examples/mlp_digits_distributed.py --epochs 10

Every rank builds the same model (same seed) in one :class:`~fastopt.FlatParams` and draws
the same shuffled order; each global batch of ``--batch-size`` examples is split between the
ranks (rank ``r`` takes every ``W``-th example from ``r``), each computes the gradient of the
mean loss of its part, and :class:`~fastopt.distributed.ShardedOptimizer` averages them,
updates its shard of the parameters with Adam (a warm-up + cosine schedule, gradients clipped
to global norm 5) and all-gathers the parameters::

    flat = fo.FlatParams.from_arrays({"W1": W1, "b1": b1, "W2": W2, "b2": b2})
    grads = flat.zeros_like()
    opt = ShardedOptimizer(fo.Adam, flat, MPI.COMM_WORLD, lr=schedule, clip_grad_norm=5.0)
    for batch in batches:
        model.loss_and_grads(X[batch[rank::world]], y[batch[rank::world]], grads)
        opt.step(grads)

Rank 0 prints the training loss after every epoch, the test accuracy and where the time went.
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

import fastopt as fo
from fastopt.examples.mlp_digits import MAX_NORM, MLP, load_digits


def train(comm, *, epochs: int, batch_size: int, lr: float, seed: int = 0, subset: int | None = None) -> dict:
    """Train on ``comm``'s ranks; return (on every rank) the per-epoch losses, the test
    accuracy, the step timings and a checksum of this rank's parameters."""
    from fastopt.distributed import ShardedOptimizer

    rank, world = comm.Get_rank(), comm.Get_size()
    X, y, X_test, y_test = load_digits(seed)
    if subset is not None:
        X, y = X[:subset], y[:subset]
    model = MLP(X.shape[1], seed=seed, dtype=X.dtype)
    flat = fo.FlatParams.from_arrays(dict(zip(("W1", "b1", "W2", "b2"), model.params)))
    model.params = [flat[name] for name in flat]  # the model now computes with the flat views
    grads = flat.zeros_like()
    grad_views = [grads[name] for name in grads]
    steps = math.ceil(len(y) / batch_size) * epochs
    schedule = fo.schedules.warmup_cosine(lr, warmup_steps=max(1, steps // 20), total_steps=steps)
    opt = ShardedOptimizer(fo.Adam, flat, comm, lr=schedule, clip_grad_norm=MAX_NORM)
    rng = np.random.default_rng(seed + 1)  # the same order on every rank
    losses = [model.loss(X, y)]
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), batch_size):
            part = order[start : start + batch_size][rank::world]
            if len(part):
                model.loss_and_grads(X[part], y[part], grad_views)
            else:
                grads.buffer[...] = 0
            opt.step(grads)
        losses.append(model.loss(X, y))
    t = opt.timings
    return {"world": world, "loss": losses, "test_accuracy": model.accuracy(X_test, y_test),
            "steps": t["steps"], "state_bytes": opt.state_nbytes,
            "ms_per_step": {k: 1e3 * v / max(1, t["steps"]) for k, v in t.items() if k != "steps"},
            "checksum": float(np.sum(flat.buffer.astype(np.float64) * np.arange(flat.buffer.size)))}


def main(argv=None) -> dict | None:
    from mpi4py import MPI

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="global batch, split between the ranks")
    parser.add_argument("--lr", type=float, default=0.03, help="peak learning rate of the schedule")
    parser.add_argument("--subset", type=int, default=None, help="keep this many training examples")
    parser.add_argument("--json", default=None, help="rank 0 writes the results here")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    result = train(comm, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, subset=args.subset)
    checksums = comm.gather(result["checksum"], root=0)
    if comm.Get_rank() != 0:
        return None
    result["checksums"] = checksums
    for epoch, loss in enumerate(result["loss"]):
        print(f"epoch {epoch:3d}  training loss {loss:.4f}")
    ms = result["ms_per_step"]
    print(f"{result['world']} rank(s): test accuracy {result['test_accuracy']:.3f}; per step "
          + ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())
          + f"; optimizer state on rank 0: {result['state_bytes']:,} bytes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()
