"""Time one ZeRO-1 Adam step per phase and the optimizer state per rank (docs/distributed.md).

Run under MPI, e.g. for 1, 2 and 3 ranks::

    for n in 1 2 3; do mpiexec -n $n python bench/distributed_step.py --params 4e6 --steps 20; done

A model of ``--params`` float32 parameters in 10 tensors (one FlatParams); each rank's
gradient is random. After ``--warmup`` steps, ``--steps`` steps are timed; rank 0 prints one
JSON line: the mean milliseconds per step of each phase (``ShardedOptimizer.timings``: the
reduce-scatter, the norm phase (empty unless ``--clip``), the fused update, the
all-gather), the whole step, each rank's optimizer state in bytes, and for comparison the
state and step time of a plain ``fo.Adam`` over the whole model in one process.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import fastopt as fo


def main() -> None:
    from mpi4py import MPI

    from fastopt.distributed import ShardedOptimizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=4e6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--clip", action="store_true", help="clip_grad_norm=1 and skip_nonfinite (the norm phase)")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    n = int(args.params)
    flat = fo.FlatParams({f"t{i}": n // 10 for i in range(10)}, np.float32)
    flat.buffer[...] = np.random.default_rng(0).standard_normal(flat.buffer.size, dtype=np.float32)
    grads = flat.zeros_like()
    grads.buffer[...] = np.random.default_rng(rank + 1).standard_normal(flat.buffer.size, dtype=np.float32)
    transforms = {"clip_grad_norm": 1.0, "skip_nonfinite": True} if args.clip else {}
    opt = ShardedOptimizer(fo.Adam, flat, comm, lr=1e-3, **transforms)
    for _ in range(args.warmup):
        opt.step(grads)
    opt.timings.update(dict.fromkeys(opt.timings, 0))
    comm.Barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        opt.step(grads)
    wall = (time.perf_counter() - t0) / args.steps
    states = comm.gather(opt.state_nbytes, root=0)
    phases = {k: 1e3 * v / args.steps for k, v in opt.timings.items() if k != "steps"}
    phases = comm.gather(phases, root=0)
    if rank:
        return
    plain = fo.Adam(flat, lr=1e-3, **transforms)
    plain.step(grads)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        plain.step(grads)
    plain_ms = 1e3 * (time.perf_counter() - t0) / args.steps
    print(json.dumps({
        "world": world, "params": flat.numel, "clip": args.clip,
        "ms_per_step": round(1e3 * wall, 3),
        "phases_ms_rank0": {k: round(v, 3) for k, v in phases[0].items()},
        "phases_ms_max": {k: round(max(p[k] for p in phases), 3) for k in phases[0]},
        "state_bytes_per_rank": states,
        "plain_adam_state_bytes": sum(b.nbytes for b in plain._flat.buffers.values()),
        "plain_adam_ms_per_step": round(plain_ms, 3),
    }))


if __name__ == "__main__":
    main()
