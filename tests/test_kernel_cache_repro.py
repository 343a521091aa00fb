"""Every kernel family gives the same bits whether it was compiled in this process, loaded from
fastopt's on-disk cache, or compiled with the cache off.

Found: the serial noise kernels loaded from the cache differed in the last bits from the freshly
compiled ones (their block function was a separate Numba function: a fresh process ran its own
copy, a cached kernel the copy linked into it, optimized again). Three processes run the same
kernels on the same inputs: A compiles them with an empty cache (and writes it), B loads them
from that cache, C compiles them with ``FASTOPT_NO_CACHE=1``; every output must match A's bit
for bit, and A and B must really have compiled and loaded.

Families: the plain update loop and the gradient-noise loop, serial and parallel, and the
gradient-norm reduction, serial and parallel; float32 and float64. Compiling every rule variant
in every family takes ~200 s on 2 cores, so a run takes each rule variant once, spread over the
(family, dtype) pairs so that every pair gets at least one; ``FASTOPT_TEST_ALL_KERNELS=1`` runs the
whole matrix.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fastopt.kernels import all_variants

FAMILIES = [(noise, parallel, dtype) for noise in (False, True) for parallel in (False, True)
            for dtype in ("float32", "float64")]


def _selection():
    rules = [r.name for r in all_variants()]
    if os.environ.get("FASTOPT_TEST_ALL_KERNELS", "") not in ("", "0"):
        return [(rule, *family) for rule in rules for family in FAMILIES]
    return [(rule, *FAMILIES[i % len(FAMILIES)]) for i, rule in enumerate(rules)]


CHILD = textwrap.dedent(
    """
    import json, sys, zlib
    import numpy as np
    from fastopt.kernels import _build, _config, all_variants, reduce

    selection, out = json.loads(sys.argv[1]), sys.argv[2]
    rules = {r.name: r for r in all_variants()}
    n = 2 * _config.CHUNK + 45                       # several chunks and a ragged end
    bounds = np.array([0, 1001, n], np.int64)        # two segments: a cut inside a chunk
    results, stats = {}, {}

    def counts(kernel):  # one dispatcher serves both dtypes: count per call, by difference
        return np.array([sum(kernel.stats.cache_hits.values()), sum(kernel.stats.cache_misses.values())])

    def record(name, kernel, before):
        stats[name] = (counts(kernel) - before).tolist()

    for rule_name, noise, parallel, dtype in selection:
        rule = rules[rule_name]
        rng = np.random.default_rng(zlib.crc32(rule_name.encode()))
        arrays = [rng.standard_normal(n).astype(dtype) for _ in range(2 + len(rule.state))]
        arrays[2:] = [abs(a) + 0.1 for a in arrays[2:]]  # state buffers of squares are positive
        table = rng.uniform(0.1, 0.9, (2, rule.ncols + noise)).astype(dtype)
        name = f"{rule_name}-{'noise' if noise else 'plain'}-{'parallel' if parallel else 'serial'}-{dtype}"
        if noise:
            kernel = _build.cpu_noise_kernel(rule, parallel, np.dtype(dtype))
            before = counts(kernel)
            for step in range(2):
                kernel(*arrays, bounds, table, np.uint64(1234567 + step), np.uint64(7))
        else:
            kernel = _build.cpu_kernel(rule, parallel)
            before = counts(kernel)
            for step in range(2):
                kernel(*arrays, bounds, table)
        results[name] = np.stack(arrays)
        record(name, kernel, before)
    for parallel in (False, True):
        for dtype in ("float32", "float64"):
            x = (np.random.default_rng(3).standard_normal(3 * _config.CHUNK + 5) * 7).astype(dtype)
            kernel = reduce._kernel(parallel)
            before = counts(kernel)
            total, finite = kernel(x, _config.CHUNK)
            name = f"sumsq-{'parallel' if parallel else 'serial'}-{dtype}"
            results[name] = np.array([total, float(finite)])
            record(name, kernel, before)
    np.savez(out, **results)
    print(json.dumps({"cache": _config.cache_enabled(), "stats": stats}))
    """
)


def _run(tmp_path, label, env):
    out = tmp_path / f"{label}.npz"
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(_selection()), str(out)], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    with np.load(out) as data:
        return {k: data[k] for k in data.files}, report


def test_selection_covers_every_family_and_every_rule():
    selection = _selection()
    assert {s[1:] for s in selection} == set(FAMILIES)
    assert {s[0] for s in selection} == {r.name for r in all_variants()}


@pytest.mark.slow
def test_cached_fresh_and_uncached_kernels_agree_bit_for_bit(tmp_path):
    base = {k: v for k, v in os.environ.items() if k not in ("FASTOPT_NO_CACHE", "FASTOPT_CACHE_DIR")}
    # NUMBA_CACHE_DIR too: a fastopt that ignored FASTOPT_CACHE_DIR would still cache privately
    cached_env = {**base, "FASTOPT_CACHE_DIR": str(tmp_path / "cache"), "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    fresh, fresh_report = _run(tmp_path, "fresh", cached_env)        # compiles, writes the cache
    loaded, loaded_report = _run(tmp_path, "loaded", cached_env)     # loads every kernel from it
    uncached, uncached_report = _run(tmp_path, "uncached", {**base, "FASTOPT_NO_CACHE": "1"})
    assert fresh_report["cache"] and not uncached_report["cache"]
    for name, (hits, misses) in fresh_report["stats"].items():
        assert (hits, misses) == (0, 1), f"{name} was not compiled in the first process"
    for name, (hits, misses) in loaded_report["stats"].items():
        assert (hits, misses) == (1, 0), f"{name} was not loaded from the cache in the second process"
    assert set(fresh) == set(loaded) == set(uncached)
    differing = []
    for name, reference in fresh.items():
        for label, other in (("loaded from the cache", loaded[name]), ("compiled uncached", uncached[name])):
            bits = reference.view(f"u{reference.itemsize}") != other.view(f"u{other.itemsize}")
            if bits.any():
                differing.append(f"{name} {label}: {int(bits.any(axis=0).sum())} elements differ")
    assert not differing, "\n".join(differing)
