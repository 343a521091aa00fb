"""fastopt vs vectorized NumPy vs torch.optim, every optimizer, at 1e3, 1e5 and 1e7 float32
parameters, grouped ``f"{rule}|{n}"``.

    pytest bench/test_bench_optimizers.py --benchmark-enable --benchmark-group-by=group \
        --benchmark-columns=median,iqr,rounds

The ordinary test run executes these once each with ``--benchmark-disable`` (pyproject's
``addopts``) so they keep working; set ``FASTOPT_BENCH_SIZES=1e3`` to smoke-test quickly.
The optimizers and options are ``fastopt.bench.SPECS`` (what ``fastopt bench`` times); the
NumPy baseline is ``fastopt._numpy_baseline``, checked against fastopt in its own tests.
torch uses ``fused=True`` where it has a fused CPU kernel, else ``foreach=True`` (skipped for
a rule torch lacks). ``extra_info`` has parameters/s, GB/s and the fraction of the same-traffic
loop's GB/s (``fastopt.bench.record_throughput``).
"""


import numpy as np
import pytest
from bench_sizes import sizes

import fastopt as fo
from fastopt.bench import SPECS, state_buffers
from fastopt.bench import record_throughput as record

SIZES = sizes("1e3,1e5,1e7")
IMPLS = ["fastopt", "numpy", "torch"]


def _setup(spec, n, impl):
    rng = np.random.default_rng(0)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    if impl == "fastopt":
        opt = getattr(fo, spec.cls)([p], **spec.options)
        return lambda: opt.step([g]), p
    if impl == "numpy":
        opt = spec.baseline(p, **spec.options)
        return lambda: opt.step(g), p
    torch = pytest.importorskip("torch")
    tp = torch.from_numpy(p)
    tp.grad = torch.from_numpy(g)
    cls = getattr(torch.optim, spec.cls, None)
    if cls is None:
        pytest.skip(f"torch.optim has no {spec.cls}")
    try:
        topt = cls([tp], fused=True, **spec.options)
        topt.step()
    except (RuntimeError, TypeError, ValueError):
        topt = cls([tp], foreach=True, **spec.options)
    return topt.step, p


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n:.0e}")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", list(SPECS))
def test_step(benchmark, rule, impl, n):
    spec = SPECS[rule]
    benchmark.group = f"{rule}|{n}"
    step, p = _setup(spec, n, impl)
    for _ in range(6):  # compile, fault pages in, take RAdam past its SGD-like first steps
        step()
    benchmark(step)
    record(benchmark, n, state_buffers=state_buffers(spec))
    assert np.isfinite(p).all()
