"""Benchmark your own optimizer against fastopt's and torch's with pytest-benchmark.

Copy this file next to your code, put your optimizer in place of ``MyAdam``, then::

    pytest test_user_example.py --benchmark-enable --benchmark-group-by=group \\
        --benchmark-columns=median,iqr,rounds --benchmark-save=mine
    # ... change your code ...
    pytest test_user_example.py --benchmark-enable --benchmark-group-by=group \\
        --benchmark-compare --benchmark-compare-fail=median:10%

(``--benchmark-enable`` only because fastopt's own ``pyproject.toml`` disables benchmarks in
the ordinary test run; elsewhere it is the default. ``FASTOPT_BENCH_SIZES=1e5,1e7`` sets the
sizes; the default, 1e5 and 1e6, keeps fastopt's own test run short.) Every benchmark records, in
``extra_info`` (``--benchmark-json``), parameters per second, GB/s of the 28 bytes a fused
Adam step must move per float32 parameter, and the fraction of ``fastopt.bench``'s same-traffic
loop (read p, g, m, v; write p, m, v) timed right after it on the same size: how far each
implementation is from the memory system's bound (``fastopt.bench.record_throughput``). See
docs/benchmarking.md.
"""

from __future__ import annotations

import os

import numba
import numpy as np
import pytest

import fastopt as fo
from fastopt import bench
from fastopt.bench import record_throughput

SIZES = [int(float(s)) for s in os.environ.get("FASTOPT_BENCH_SIZES", "1e5,1e6").split(",")]
LR, BETAS, EPS = 1e-3, (0.9, 0.999), 1e-8


class MyAdam:
    """A user's own Adam in vectorized NumPy (torch's formula), the code under test."""

    def __init__(self, p: np.ndarray):
        self.p, self.t = p, 0
        self.m, self.v = np.zeros_like(p), np.zeros_like(p)
        self.tmp = np.empty_like(p)

    def step(self, g: np.ndarray) -> None:
        b1, b2 = BETAS
        self.t += 1
        self.m *= b1
        self.m += (1 - b1) * g
        self.v *= b2
        np.multiply(g, g, out=self.tmp)
        self.tmp *= 1 - b2
        self.v += self.tmp
        step_size = LR / (1 - b1**self.t)
        np.sqrt(self.v, out=self.tmp)
        self.tmp /= np.sqrt(1 - b2**self.t)
        self.tmp += EPS
        np.divide(self.m, self.tmp, out=self.tmp)
        self.tmp *= step_size
        self.p -= self.tmp


def make_step(impl: str, p: np.ndarray, g: np.ndarray):
    if impl == "mine":
        opt = MyAdam(p)
        return lambda: opt.step(g)
    if impl == "fastopt":
        opt = fo.Adam([p], lr=LR, betas=BETAS, eps=EPS)
        return lambda: opt.step([g])
    torch = pytest.importorskip("torch")
    torch.set_num_threads(numba.get_num_threads())  # the same cores as fastopt
    tp = torch.from_numpy(p)
    tp.grad = torch.from_numpy(g)
    opt = torch.optim.Adam([tp], lr=LR, betas=BETAS, eps=EPS, fused=True)
    return opt.step


def test_same_numbers():
    """Before timing anything: all three compute the same Adam."""
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(1000).astype(np.float32)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(5)]
    impls = ["mine", "fastopt"] + (["torch"] if bench.torch_available() else [])
    results = {}
    for impl in impls:
        p, g = p0.copy(), np.empty_like(p0)
        step = make_step(impl, p, g)
        for gi in grads:
            g[...] = gi
            step()
        results[impl] = p
    for impl in impls[1:]:
        np.testing.assert_allclose(results[impl], results["mine"], rtol=1e-5, atol=1e-6, err_msg=impl)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n:.0e}")
@pytest.mark.parametrize("impl", ["mine", "fastopt", "torch"])
def test_adam_step(benchmark, impl, n):
    benchmark.group = f"adam|{n:.0e}"
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    step = make_step(impl, p, g)
    step()  # compile (fastopt) and touch every buffer
    benchmark(step)
    # params/s, GB/s of Adam's 28 bytes per parameter, and the fraction of a loop that moves
    # the same bytes (read p, g, m, v; write p, m, v) timed right after, on this size
    record_throughput(benchmark, n, state_buffers=2)
    assert np.isfinite(p).all()
