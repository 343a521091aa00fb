"""One Adam step over a model of many tensors: FlatParams vs separate arrays vs torch.optim.

The model: 500 tensors of mixed sizes (250 weight matrices of varied shapes and their bias
vectors), about 1e7 float32 parameters in all. Compared, one step each:

- ``flat``: ``fo.Adam(flat)``, one FlatParams, one group: one kernel launch;
- ``flat-2groups``: the same with weights and biases in two param groups (different weight
  decay): still one launch, so it should cost the same as one group;
- ``one-buffer``: ``fo.Adam([x])`` with one plain array of the same total size (the bound
  for ``flat``: no segments, no padding);
- ``list``: ``fo.Adam(list_of_500_arrays)``, the per-array path: 500 launches;
- ``torch-fused``: ``torch.optim.Adam(fused=True)`` over the same 500 tensors;
- ``same-traffic``: a parallel Numba loop that moves Adam's bytes (reads p, g, m, v; writes
  p, m, v) with next to no arithmetic: the memory system's bound for any Adam step here.

In the ordinary test run (``--benchmark-disable``) this is a smoke test on a small model.
For the real numbers::

    FASTOPT_BENCH_FULL=1 pytest bench/test_bench_flat.py --benchmark-enable \\
        --benchmark-json=flat.json

pytest-benchmark times the contenders one after another, so on a shared machine a change of
load between them skews the ratios; ``FASTOPT_BENCH_FULL=1 python bench/test_bench_flat.py``
times them round-robin instead and prints the medians and the ratios (all contenders'
buffers then compete for the cache), and ``... test_bench_flat.py --alone`` times each in a
process of its own.

Traffic: Adam moves 28 bytes per float32 parameter per step (reads p, g, m, v; writes p, m,
v), recorded as ``extra_info["bytes_per_step"]``, with parameters/s, GB/s and the fraction of
``fastopt.bench``'s same-traffic loop (``fastopt.bench.record_throughput``) for every contender.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastopt as fo
from fastopt.bench import record_throughput as record

FULL = os.environ.get("FASTOPT_BENCH_FULL", "") not in ("", "0")
NTENSORS = 500
TARGET = 10_000_000 if FULL else 200_000
LR = 1e-3


def model_shapes(total: int = TARGET, ntensors: int = NTENSORS, seed: int = 0) -> dict[str, tuple]:
    """``ntensors // 2`` layers, each a weight (rows, cols) and a bias (cols,), ~``total`` elements."""
    rng = np.random.default_rng(seed)
    layers = ntensors // 2
    cols = rng.integers(16, 1024, size=layers)
    weight = rng.lognormal(0.0, 1.0, size=layers)
    budget = total - int(cols.sum())
    rows = np.maximum(1, np.round(weight / weight.sum() * budget / cols)).astype(int)
    shapes = {}
    for i in range(layers):
        shapes[f"layer{i}.weight"] = (int(rows[i]), int(cols[i]))
        shapes[f"layer{i}.bias"] = (int(cols[i]),)
    return shapes


SHAPES = model_shapes()
NPARAMS = sum(int(np.prod(s)) for s in SHAPES.values())


def fill(arrays, seed):
    """Small random values, the same for every contender (NumPy arrays or torch tensors)."""
    rng = np.random.default_rng(seed)
    for a in arrays:
        values = rng.standard_normal(tuple(a.shape), dtype=np.float32) * np.float32(0.01)
        if isinstance(a, np.ndarray):
            a[...] = values
        else:
            a.copy_(__import__("torch").from_numpy(values))


@pytest.fixture
def info(benchmark):
    benchmark.group = f"adam-step|{len(SHAPES)} tensors|{NPARAMS:.2e} params"
    benchmark.extra_info.update(params=NPARAMS, tensors=len(SHAPES), bytes_per_step=28 * NPARAMS)
    return benchmark


def flat_model():
    flat = fo.FlatParams(SHAPES)
    grads = flat.zeros_like()
    fill([flat.buffer], 1)
    fill([grads.buffer], 2)
    return flat, grads


def setup_flat():
    flat, grads = flat_model()
    opt = fo.Adam(flat, lr=LR)
    return lambda: opt.step(grads)


def setup_flat_two_groups():
    flat, grads = flat_model()
    opt = fo.Adam([{"params": flat.select("*.weight"), "weight_decay": 1e-2},
                   {"params": flat.select("*.bias"), "weight_decay": 0.0}], lr=LR)
    return lambda: opt.step(grads)


def setup_one_buffer():
    p = np.zeros(NPARAMS, np.float32)
    g = np.zeros(NPARAMS, np.float32)
    fill([p], 1)
    fill([g], 2)
    opt = fo.Adam([p], lr=LR)
    return lambda: opt.step([g])


def setup_list():
    params = [np.zeros(s, np.float32) for s in SHAPES.values()]
    grads = [np.zeros(s, np.float32) for s in SHAPES.values()]
    fill(params, 1)
    fill(grads, 2)
    opt = fo.Adam(params, lr=LR)
    return lambda: opt.step(grads)


def setup_torch_fused():
    torch = pytest.importorskip("torch")
    params = [torch.zeros(s, dtype=torch.float32, requires_grad=True) for s in SHAPES.values()]
    with torch.no_grad():
        fill(params, 1)
    for p in params:
        p.grad = torch.zeros_like(p)
    fill([p.grad for p in params], 2)
    opt = torch.optim.Adam(params, lr=LR, fused=True)
    return opt.step


def _same_traffic_kernel():
    from numba import njit, prange

    from fastopt.kernels import _config

    @njit(parallel=True, fastmath=_config.FASTMATH, error_model=_config.ERROR_MODEL)
    def kernel(p, g, m, v, c):
        n = p.size
        for k in prange((n + _config.CHUNK - 1) // _config.CHUNK):
            lo = k * _config.CHUNK
            hi = min(lo + _config.CHUNK, n)
            for i in range(np.uint64(lo), np.uint64(hi)):
                gi = g[i]
                mi = m[i] + c * gi
                vi = v[i] + c * gi
                m[i] = mi
                v[i] = vi
                p[i] = p[i] - c * (mi + vi)

    return kernel


def setup_same_traffic():
    p, g, m, v = (np.zeros(NPARAMS, np.float32) for _ in range(4))
    fill([p, g, m, v], 3)
    kernel = _same_traffic_kernel()
    c = np.float32(LR)
    return lambda: kernel(p, g, m, v, c)


CONTENDERS = {
    "flat": setup_flat,
    "flat-2groups": setup_flat_two_groups,
    "one-buffer": setup_one_buffer,
    "list": setup_list,
    "torch-fused": setup_torch_fused,
    "same-traffic": setup_same_traffic,
}


@pytest.mark.parametrize("name", list(CONTENDERS))
def test_adam_step(info, name):
    step = CONTENDERS[name]()
    step()  # compile and touch every buffer before timing
    info(step)
    record(info, NPARAMS, state_buffers=2)


def interleaved(rounds: int = 10, block: int = 4) -> dict[str, float]:
    """Median seconds per step of every contender, timed in alternating blocks so that all
    see the same load on a shared machine (pytest-benchmark times them one after another).

    The first step of each block is not counted: fastopt (Numba's OpenMP pool) and torch
    (its own OpenMP runtime) each leave worker threads spinning for a moment after a
    parallel region, which would slow whichever runs next.
    """
    import time

    steps = {name: setup() for name, setup in CONTENDERS.items()}
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            step()
            for _ in range(block - 1):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def alone(name: str, steps: int = 60) -> float:
    """Median seconds per step of one contender, timed with nothing else allocated."""
    import time

    step = CONTENDERS[name]()
    for _ in range(5):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def report(medians: dict[str, float], how: str) -> None:
    print(f"{len(SHAPES)} tensors, {NPARAMS:,} float32 parameters; {how}")
    for name, t in medians.items():
        print(f"  {name:13s} {t * 1e3:8.2f} ms  {28 * NPARAMS / t / 1e9:6.1f} GB/s")
    flat, bound = medians["flat"], medians["same-traffic"]
    print(f"  torch-fused / flat         = {medians['torch-fused'] / flat:.2f}  (target >= 1.8)")
    print(f"  flat / one-buffer          = {flat / medians['one-buffer']:.3f} (target <= 1.10)")
    print(f"  flat-2groups / flat        = {medians['flat-2groups'] / flat:.3f} (target <= 1.0, noise aside)")
    print(f"  list / flat                = {medians['list'] / flat:.2f}")
    print(f"  flat / same-traffic        = {flat / bound:.3f} (1.0 is the memory bound)")
    print(f"  torch-fused / same-traffic = {medians['torch-fused'] / bound:.2f} (the most any Adam can gain)")


if __name__ == "__main__":
    import subprocess
    import sys

    if sys.argv[1:2] == ["--one"]:
        print(alone(sys.argv[2]))
    elif sys.argv[1:2] == ["--alone"]:  # each contender in its own process, its buffers alone in cache
        medians = {name: float(subprocess.run([sys.executable, __file__, "--one", name], check=True,
                                              capture_output=True, text=True, timeout=600).stdout.split()[-1])
                   for name in CONTENDERS}
        report(medians, "each alone in its own process, median of 60 steps")
    else:
        report(interleaved(), "median of 30 steps in alternating blocks")
