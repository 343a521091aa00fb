"""The cost of the fused gradient transforms on one Adam step (float32).

    FASTOPT_BENCH_SIZES=1e7 pytest bench/test_bench_transforms.py --benchmark-enable \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

Each group ``transforms|n`` times one step of:

- ``fastopt``: plain fused Adam (the baseline);
- ``fastopt clip+skip``: with ``clip_grad_norm`` and ``skip_nonfinite`` (one extra read of
  the gradients: the norm pass; target <= 1.5x the baseline);
- ``torch clip+fused``: ``torch.nn.utils.clip_grad_norm_`` then ``torch.optim.Adam(fused=True)``
  (fastopt clip+skip should beat it by >= 1.2x); ``torch fused`` alone for reference;
- ``fastopt noise``: with ``grad_noise`` (target: <= 1.3x the baseline), and all three.

The default size is a smoke test; ``FASTOPT_BENCH_SIZES`` sets real ones. ``extra_info``:
parameters/s, GB/s of a fused Adam step's 28 bytes per parameter (the clip's extra read of the
gradients is not counted, so it shows as a lower fraction) and the fraction of the same-traffic
loop; the norm alone reads 4 bytes per parameter and has no same-traffic loop (roofline None).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from bench_sizes import sizes

import fastopt as fo
from fastopt.bench import record_throughput as record

OPTIONS = {
    "fastopt": {},
    "fastopt clip+skip": {"clip_grad_norm": 1.0, "skip_nonfinite": True},
    "fastopt noise": {"grad_noise": (0.01, 0.55), "seed": 0},
    "fastopt clip+skip+noise": {"clip_grad_norm": 1.0, "skip_nonfinite": True, "grad_noise": (0.01, 0.55),
                                "seed": 0},
}
TORCH = ["torch clip+fused", "torch fused"]


def _fastopt_step(n, options):
    rng = np.random.default_rng(0)
    w = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    opt = fo.Adam([w], lr=1e-3, **options)
    return lambda: opt.step([g])


def _torch_step(n, clip):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(numba.get_num_threads())  # the same cores as the Numba kernels
    rng = np.random.default_rng(0)
    w = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).requires_grad_()
    g = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    opt = torch.optim.Adam([w], lr=1e-3, fused=True)

    def step():
        w.grad = g
        if clip:
            torch.nn.utils.clip_grad_norm_([w], 1.0)
        opt.step()

    return step


@pytest.mark.parametrize("n", sizes("1e5"))
@pytest.mark.parametrize("impl", list(OPTIONS) + TORCH)
def test_adam_step(benchmark, impl, n):
    benchmark.group = f"transforms|{n}"
    step = _fastopt_step(n, OPTIONS[impl]) if impl in OPTIONS else _torch_step(n, impl == "torch clip+fused")
    step()  # compile / warm up
    benchmark(step)
    record(benchmark, n, state_buffers=2)


@pytest.mark.parametrize("n", sizes("1e5"))
@pytest.mark.parametrize("impl", ["fastopt", "torch"])
def test_grad_norm(benchmark, impl, n):
    """The norm pass alone: fastopt's fixed-chunk reduction vs torch.linalg.vector_norm."""
    benchmark.group = f"norm|{n}"
    g = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    if impl == "fastopt":
        fn = lambda: fo.grad_norm(g)
    else:
        torch = pytest.importorskip("torch")
        torch.set_num_threads(numba.get_num_threads())
        tg = torch.from_numpy(g)
        fn = lambda: float(torch.linalg.vector_norm(tg))
    expected = float(np.linalg.norm(g.astype(np.float64)))
    assert fn() == pytest.approx(expected, rel=1e-12 if impl == "fastopt" else 1e-3)  # torch sums in float32
    benchmark(fn)
    record(benchmark, n, state_buffers=None, bytes_per_param=4, against="none: a read-only reduction")
