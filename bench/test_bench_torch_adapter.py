"""``fastopt.torch`` vs ``torch.optim`` on a real ``nn.Module``: one optimizer step, gradients
pre-filled, float32, grouped ``f"torch-adapter|{rule}|{tensors} tensors|{params}"``.

The model: an MLP of 10 ``nn.Linear(1000, 1000)`` layers, 20 tensors, 1.0e7 parameters
(``FASTOPT_BENCH_FULL=1``; otherwise width 100, 1.0e5 parameters, a smoke test). Contenders:

- ``fot``: ``fastopt.torch.<Rule>`` (one fused Numba kernel per tensor, zero-copy views);
- ``torch-fused``: ``torch.optim.<Rule>(fused=True)`` where torch has a fused CPU kernel
  (Adam, AdamW, SGD, Adagrad);
- ``torch-foreach``: ``torch.optim.<Rule>(foreach=True)`` (multi-tensor ops), the fastest
  torch path for NAdam, RAdam, RMSprop, Adamax, Adadelta.

    FASTOPT_BENCH_FULL=1 pytest bench/test_bench_torch_adapter.py --benchmark-enable \\
        --benchmark-group-by=group --benchmark-columns=median,iqr,rounds

pytest-benchmark times contenders one after another; on a shared machine
``FASTOPT_BENCH_FULL=1 python bench/test_bench_torch_adapter.py`` times them round-robin per
rule and prints the medians and ratios (``--threads N`` gives torch and Numba N threads each).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as fot  # noqa: E402
from fastopt import bench  # noqa: E402

STATE_BUFFERS = 2  # exp_avg and exp_avg_sq, for each of the rules below

FULL = os.environ.get("FASTOPT_BENCH_FULL", "") not in ("", "0")
WIDTH, DEPTH = (1000, 10) if FULL else (100, 10)
BYTES = {rule: bench.bytes_per_param(STATE_BUFFERS) for rule in ("adam", "nadam", "radam")}  # 28 per float32
RULES = {"adam": "Adam", "nadam": "NAdam", "radam": "RAdam"}
OPTIONS = {"adam": dict(lr=1e-3), "nadam": dict(lr=1e-3), "radam": dict(lr=1e-3)}


def make_model(seed: int = 0) -> torch.nn.Module:
    """The MLP, with every gradient filled (small random values, the same for every contender)."""
    torch.manual_seed(seed)
    layers = []
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(WIDTH, WIDTH), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    gen = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 1e-2
    return model


NTENSORS = 2 * DEPTH
NPARAMS = DEPTH * (WIDTH * WIDTH + WIDTH)


def contenders(rule: str) -> list[str]:
    names = ["fot", "torch-foreach"]
    return names[:1] + ["torch-fused"] + names[1:] if rule == "adam" else names


def setup(rule: str, impl: str):
    """``step()`` of one contender over its own model."""
    params = list(make_model().parameters())
    name, options = RULES[rule], OPTIONS[rule]
    if impl == "fot":
        opt = getattr(fot, name)(params, **options)
    elif impl == "torch-fused":
        opt = getattr(torch.optim, name)(params, fused=True, **options)
    else:
        opt = getattr(torch.optim, name)(params, foreach=True, **options)
    return opt.step


CASES = [(rule, impl) for rule in RULES for impl in contenders(rule)]


@pytest.mark.parametrize("rule,impl", CASES, ids=[f"{r}-{i}" for r, i in CASES])
def test_step(benchmark, rule, impl):
    benchmark.group = f"torch-adapter|{rule}|{NTENSORS} tensors|{NPARAMS:.1e} params"
    benchmark.extra_info.update(tensors=NTENSORS, bytes_per_step=BYTES[rule] * NPARAMS)
    step = setup(rule, impl)
    for _ in range(6):  # compile, fault pages in, take RAdam past its SGD-like first steps
        step()
    benchmark(step)
    bench.record_throughput(benchmark, NPARAMS, state_buffers=STATE_BUFFERS)


def interleaved(rule: str, rounds: int = 15, block: int = 4) -> dict[str, float]:
    """Median seconds per step of each contender for ``rule``, timed in alternating blocks so
    all see the same load (the first step of a block is not counted: each runtime leaves its
    threads spinning for a moment after a parallel region)."""
    import time

    import numpy as np

    steps = {impl: setup(rule, impl) for impl in contenders(rule)}
    for step in steps.values():
        for _ in range(6):
            step()
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for _ in range(rounds):
        for impl, step in steps.items():
            step()
            for _ in range(block - 1):
                start = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - start)
    return {impl: float(np.median(t)) for impl, t in times.items()}


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--threads"]:  # the same thread count for both runtimes (a loaded machine)
        import numba

        torch.set_num_threads(int(sys.argv[2]))
        numba.set_num_threads(int(sys.argv[2]))
    print(f"MLP {DEPTH}x Linear({WIDTH}, {WIDTH}): {NTENSORS} tensors, {NPARAMS:,} float32 parameters, "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")
    for rule in RULES:
        medians = interleaved(rule)
        fast = medians["fot"]
        for impl, t in medians.items():
            print(f"  {rule:6s} {impl:14s} {t * 1e3:8.2f} ms  {BYTES[rule] * NPARAMS / t / 1e9:6.1f} GB/s  "
                  f"{t / fast:5.2f}x fot's time")
