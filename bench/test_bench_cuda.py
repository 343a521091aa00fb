"""GPU benchmarks: fastopt's CUDA kernels against torch.optim on CUDA and the copy roofline.

For Adam (28 bytes per float32 parameter), SGD with momentum (20) and RMSprop (20) at 2^20,
2^24 and 2^26 parameters: fastopt on Numba device arrays, ``torch.optim`` fused and foreach
(where torch has them), and the device's own copy bandwidth measured in the same run
(``cudaMemcpy`` device to device, 2 bytes moved per byte copied). Each round runs
``STEPS`` steps and synchronizes; ``extra_info`` holds parameters per second, the effective
bandwidth and its fraction of the copy bandwidth. Plus the time of one small step (1e3
parameters) from Python, fastopt against ``torch.optim.Adam(fused=True)``.

Skipped without a GPU. ``FASTOPT_BENCH_CUDA_SIZES=64`` (comma-separated sizes) shrinks the
sizes and then also runs under the CUDA simulator, as a smoke test of this file. Run with::

    python -m pytest bench/test_bench_cuda.py --benchmark-enable --benchmark-group-by=group
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import fastopt as fo
from fastopt.kernels import cuda as kcuda

_SIZES_ENV = os.environ.get("FASTOPT_BENCH_CUDA_SIZES")
if not kcuda.available() or (kcuda.simulator() and not _SIZES_ENV):
    pytest.skip("needs a CUDA GPU (or the simulator with FASTOPT_BENCH_CUDA_SIZES set)", allow_module_level=True)

SIZES = [int(s) for s in _SIZES_ENV.split(",")] if _SIZES_ENV else [1 << 20, 1 << 24, 1 << 26]
STEPS = 10
SMALL = 1000

# rule: (fastopt class, options, torch class name, bytes moved per float32 parameter)
RULES = {
    "adam": (fo.Adam, {"lr": 1e-3}, "Adam", 28),
    "sgd_momentum": (fo.SGD, {"lr": 1e-3, "momentum": 0.9}, "SGD", 20),
    "rmsprop": (fo.RMSprop, {"lr": 1e-3}, "RMSprop", 20),
}


@pytest.fixture(scope="module")
def cuda():
    return kcuda.require()


@pytest.fixture(scope="module")
def copy_bandwidth(cuda) -> float:
    """Device-to-device copy bandwidth in bytes per second (read + write), best of 5."""
    n = max(SIZES) * 4  # as many bytes as four float32 buffers of the largest size
    src = cuda.device_array(n, np.uint8)
    dst = cuda.device_array(n, np.uint8)
    best = float("inf")
    for _ in range(5):
        start, end = cuda.event(), cuda.event()
        start.record()
        for _ in range(STEPS):
            dst.copy_to_device(src)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / STEPS)  # ms
    return 2 * n / best if best > 0 else float("nan")


def _torch_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    return torch


def _report(benchmark, n: int, bytes_per_param: int, bandwidth: float) -> None:
    if benchmark.disabled or benchmark.stats is None:
        return
    per_step = benchmark.stats.stats.min / STEPS
    gbps = bytes_per_param * n / per_step / 1e9
    benchmark.extra_info.update({  # the keys of fastopt.bench.record_throughput, the copy as the roofline
        "params": n, "bytes_per_param": bytes_per_param, "params_per_s": n / per_step, "gb_per_s": gbps,
        "probe_gb_per_s": bandwidth / 1e9, "roofline": gbps * 1e9 / bandwidth,
        "roofline_against": "device-to-device copy",
    })


def _run(benchmark, step, sync) -> None:
    def steps():
        for _ in range(STEPS):
            step()
        sync()

    benchmark.pedantic(steps, rounds=10, warmup_rounds=2)


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n))
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("impl", ["fastopt", "torch-fused", "torch-foreach"])
def test_large_step(benchmark, cuda, copy_bandwidth, impl, rule, n):
    cls, options, torch_name, bytes_per_param = RULES[rule]
    benchmark.group = f"{rule}|{n}"
    rng = np.random.default_rng(0)
    host = rng.standard_normal(n).astype(np.float32)
    if impl == "fastopt":
        p, g = cuda.to_device(host), cuda.to_device(host * 1e-3)
        opt = cls([p], **options)
        _run(benchmark, lambda: opt.step([g]), cuda.synchronize)
    else:
        torch = _torch_cuda()
        p = torch.tensor(host, device="cuda", requires_grad=True)
        p.grad = torch.tensor(host * 1e-3, device="cuda")
        flag = {"fused": True} if impl == "torch-fused" else {"foreach": True}
        try:
            opt = getattr(torch.optim, torch_name)([p], **options, **flag)
            opt.step()
        except (RuntimeError, TypeError, ValueError) as exc:
            pytest.skip(f"torch.optim.{torch_name}({flag}) is not available: {exc}")
        _run(benchmark, opt.step, torch.cuda.synchronize)
    _report(benchmark, n, bytes_per_param, copy_bandwidth)


@pytest.mark.parametrize("impl", ["fastopt", "torch-fused"])
def test_small_step_from_python(benchmark, cuda, impl):
    """Host time of one Adam step on 1e3 parameters (launch overhead; no synchronization
    inside the timed call, the queue is drained after)."""
    benchmark.group = f"adam|{SMALL}|per-step"
    host = np.ones(SMALL, np.float32)
    if impl == "fastopt":
        p, g = cuda.to_device(host), cuda.to_device(host)
        opt = fo.Adam([p])
        grads = [g]
        benchmark(opt.step, grads)
        cuda.synchronize()
    else:
        torch = _torch_cuda()
        p = torch.tensor(host, device="cuda", requires_grad=True)
        p.grad = torch.ones_like(p)
        opt = torch.optim.Adam([p], fused=True)
        benchmark(opt.step)
        torch.cuda.synchronize()
