"""Where the time of ``grad_noise`` goes: the deviates alone against the Adam step they join.

    FASTOPT_BENCH_SIZES=1e7 NUMBA_NUM_THREADS=1 pytest bench/test_bench_noise.py --benchmark-enable \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group ``noise|n|dtype`` times, interleaved round by round so that a shared machine's load
hits all three alike:

- ``adam``: one plain fused Adam step;
- ``adam noise``: the same step with ``grad_noise``;
- ``deviates``: drawing the n deviates alone (``kernels.noise`` fill, the same fixed chunks
  and threads as the kernels, into a preallocated buffer).

``extra_info`` also has the noisy step's parameters/s, GB/s and fraction of the same-traffic
loop (Adam's traffic: the deviates add arithmetic, not memory traffic).

``adam noise`` is about ``adam`` plus ``deviates``: the update loop is compute-bound on this
class of CPU (it scales with the cores), so the generator's arithmetic does not hide behind
memory traffic, and ``deviates / adam`` is the floor of the noise overhead.
"""

from __future__ import annotations

import time

import numba
import numpy as np
import pytest
from bench_sizes import sizes

import fastopt as fo
from fastopt.bench import record_throughput as record
from fastopt.kernels import _config, noise


def _parallel_fill(dtype):
    fill = noise.generator(dtype)[2]
    chunk = _config.CHUNK

    @numba.njit(parallel=True, fastmath=_config.FASTMATH, error_model=_config.ERROR_MODEL)
    def draw(out, key):
        nchunks = (out.size + chunk - 1) // chunk
        for c in numba.prange(nchunks):
            lo = c * chunk
            hi = min(lo + chunk, out.size)
            fill(out[lo:hi], key, np.uint64(lo))

    return draw


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", sizes("1e5"))
def test_noise_cost(benchmark, n, dtype):
    benchmark.group = f"noise|{n}|{np.dtype(dtype).name}"
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal(n).astype(dtype)
    w2 = w1.copy()
    g = rng.standard_normal(n).astype(dtype)
    plain = fo.Adam([w1], lr=1e-3)
    noisy = fo.Adam([w2], lr=1e-3, grad_noise=(0.01, 0.55), seed=0)
    out = np.empty(n, dtype)
    draw = _parallel_fill(dtype)
    key = noise.stream_key(0, 0)
    fns = {"adam": lambda: plain.step([g]), "adam noise": lambda: noisy.step([g]),
           "deviates": lambda: draw(out, key)}
    for f in fns.values():
        f()  # compile
    times = {name: [] for name in fns}
    for _ in range(1 if benchmark.disabled else 15):  # a smoke run when benchmarks are off
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    med = {name: float(np.median(v)) for name, v in times.items()}
    benchmark.extra_info.update({f"median_ms {k}": 1e3 * v for k, v in med.items()})
    benchmark.extra_info["noise step / plain step"] = med["adam noise"] / med["adam"]
    benchmark.extra_info["deviates / plain step"] = med["deviates"] / med["adam"]
    benchmark.extra_info["ns per deviate and thread"] = 1e9 * med["deviates"] * numba.get_num_threads() / n
    benchmark(fns["adam noise"])
    record(benchmark, n, state_buffers=2, dtype=dtype)
