"""What the compiled kernels look like: float32 math stays float32, the hot loop vectorizes,
steady-state steps neither compile nor allocate, and the on-disk cache works (or is skipped
with a warning where it cannot be written)."""

import os
import re
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from registry import CASES

import fastopt as fo
from fastopt.kernels import _build, all_variants

f32 = np.float32


def _compiled(rule, parallel, dtype):
    kernel = _build.build_cpu_kernel(rule, parallel, cache=False)  # cached code cannot be inspected
    n = 64
    args = [np.zeros(n, dtype), np.zeros(n, dtype), *[np.ones(n, dtype) for _ in rule.state],
            np.array([0, n], np.int64), np.ones((1, rule.ncols), dtype)]
    kernel(*args)
    return kernel


def _ir(kernel):
    ir = "\n".join(kernel.inspect_llvm().values())
    assert re.search(r"fmul( \w+)* float ", ir), "no float32 math in the IR"
    return ir


@pytest.mark.parametrize("rule", all_variants(), ids=lambda r: r.name)
def test_float32_kernels_do_no_float64_math(rule):
    ir = _ir(_compiled(rule, False, f32))
    assert "fpext" not in ir, f"{rule.name}: float32 kernel promotes to double"
    assert not re.search(r"= f(add|sub|mul|div)[^\n]* double ", ir), f"{rule.name}: float64 arithmetic"


@pytest.mark.parametrize("rule", all_variants(), ids=lambda r: r.name)
def test_element_functions_use_no_literals(rule):
    """A literal in an element function would be a float64 constant in float32 math."""
    code = rule.element.__code__
    numbers = [c for c in code.co_consts if isinstance(c, (int, float)) and not isinstance(c, bool)]
    assert numbers == [], f"{rule.name} uses literals {numbers}"


@pytest.mark.parametrize("name", ["adam", "sgd_momentum", "rmsprop_centered_momentum", "adam_amsgrad"])
def test_hot_loop_vectorizes(name):
    rule = next(r for r in all_variants() if r.name == name)
    asm = "\n".join(_compiled(rule, False, f32).inspect_asm().values())
    packed_fma = re.findall(r"vfmadd\w*ps\s+[^\n]*%[yz]mm", asm)
    packed_loads = re.findall(r"vmovups\s+[^\n]*%[yz]mm", asm)
    assert packed_fma, f"{name}: no packed FMA on ymm/zmm registers"
    assert packed_loads, f"{name}: no packed loads"


def _noise_kernel_asm(rule):
    kernel = _build.build_cpu_noise_kernel(rule, False, f32, cache=False)
    n = 100  # a whole block and cut ones (the offset is not a multiple of 32)
    args = [np.zeros(n, f32), np.ones(n, f32), *[np.ones(n, f32) for _ in rule.state],
            np.array([0, n], np.int64), np.ones((1, rule.ncols + 1), f32)]
    kernel(*args, np.uint64(1), 5)
    return "\n".join(kernel.inspect_asm().values())


def test_noise_kernel_prefetches_and_uses_wide_vectors_where_the_cpu_has_them():
    """The noise loop prefetches its streams and, on an AVX-512 CPU, runs on 512-bit registers
    (``kernels._llvm``); the plain kernels keep LLVM's default width."""
    import llvmlite.binding as llvm

    rule = next(r for r in all_variants() if r.name == "adam")
    asm = _noise_kernel_asm(rule)
    assert re.search(r"prefetcht0\s", asm), "no software prefetch in the noise kernel"
    assert re.search(r"vsqrtps\s+[^\n]*%[yz]mm", asm), "the noise loop is not vectorized"
    if "+avx512f" in llvm.get_host_cpu_features().flatten().split(","):
        assert re.search(r"vfmadd\w*ps\s+[^\n]*%zmm", asm), "no 512-bit FMA in the noise kernel"


def test_prefetch_past_the_end_of_an_array_is_harmless():
    from numba import njit

    from fastopt.kernels._llvm import prefetch

    @njit
    def touch(a, far):
        prefetch(a, far)  # never faults, whatever the address
        return a[0]

    assert touch(np.arange(4.0), 1 << 40) == 0.0


def test_parallel_kernel_does_no_float64_math():
    rule = next(r for r in all_variants() if r.name == "adam")
    ir = _ir(_compiled(rule, True, f32))
    assert "fpext" not in ir


def test_no_new_compilation_after_the_second_step(rng):
    def n_signatures():
        return sum(len(_build.cpu_kernel(r, False).signatures) for r in all_variants())

    for case in CASES:
        w = rng.standard_normal(100).astype(f32)
        opt = case.make([w])
        for _ in range(2):
            opt.step([rng.standard_normal(100).astype(f32)])
        before = n_signatures()
        for _ in range(10):  # RAdam switches variant at step 6; it must have compiled by then
            opt.step([rng.standard_normal(100).astype(f32)])
        after = n_signatures()
        if case.rule != "radam":
            assert after == before, f"{case.id} compiled again after the second step"


def test_steady_state_step_allocates_no_arrays(rng):
    params = [rng.standard_normal((64, 32)).astype(f32), rng.standard_normal(32).astype(f32)]
    grads = [np.ones_like(p) for p in params]
    opt = fo.Adam(params, lr=1e-3, amsgrad=True)
    opt.step(grads)
    opt.step(grads)
    tracemalloc.start()
    try:
        snap0 = tracemalloc.take_snapshot()
        for _ in range(20):
            opt.step(grads)
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    numpy_domain = np.lib.tracemalloc_domain
    flt = [tracemalloc.DomainFilter(True, numpy_domain)]
    grown = sum(s.size_diff for s in snap1.filter_traces(flt).compare_to(snap0.filter_traces(flt), "lineno"))
    assert grown <= 0, f"steady-state steps allocated {grown} bytes of NumPy data"


def _run(code, env=None):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_second_process_loads_kernels_from_the_cache(tmp_path):
    code = """
        import numpy as np, fastopt as fo
        from fastopt.kernels import _build, adam
        w = np.zeros(1000, np.float32)
        fo.Adam([w]).step([np.ones_like(w)])
        k = _build.cpu_kernel(adam.ADAM, False)
        print(sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values()))
    """
    env = {"NUMBA_CACHE_DIR": str(tmp_path)}
    first = _run(code, env)
    assert first.returncode == 0, first.stderr
    second = _run(code, env)
    assert second.returncode == 0, second.stderr
    hits, misses = map(int, second.stdout.split())
    assert hits >= 1 and misses == 0, second.stdout
