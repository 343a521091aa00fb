"""A kernel loaded from Numba's on-disk cache computes exactly what the freshly compiled kernel
computed, and the parallel kernel matches the serial one bit for bit either way.

Found while vectorizing the loops: with one loop shape and LLVM's ``reassoc`` flag, the cached
parallel kernel rounded differently (1 ulp on ~4% of elements) from the process that compiled
it, so results depended on whether the cache was warm. The first run here compiles and writes
a private cache; the second loads it."""

import os
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import sys
import numpy as np
import fastopt as fo
from fastopt.kernels import _config

rng = np.random.default_rng(5)
n = 3 * _config.CHUNK + 17
p0 = rng.standard_normal(n).astype(np.float32)
grads = [(rng.standard_normal(n) * 3).astype(np.float32) for _ in range(8)]
for name, min_work in (("parallel", 0), ("serial", 1 << 62)):
    _config.PARALLEL_MIN_WORK = min_work
    w = p0.copy()
    opt = fo.RAdam([w], lr=0.01, weight_decay=0.05, betas=(0.9, 0.9))  # both RAdam phases
    for g in grads:
        opt.step([g])
    np.save(f"{sys.argv[1]}_{name}.npy", w)
"""


def test_cached_parallel_kernel_matches_fresh_and_serial(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("FASTOPT_NO_CACHE", None)
    for run in ("compiled", "cached"):  # the first run writes the cache, the second loads it
        subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / run)], env=env, check=True, timeout=600)
    assert any(f.endswith(".nbc") for _, _, files in os.walk(tmp_path / "cache") for f in files)
    results = {(run, kind): np.load(tmp_path / f"{run}_{kind}.npy")
               for run in ("compiled", "cached") for kind in ("parallel", "serial")}
    reference = results["compiled", "serial"]
    for key, value in results.items():
        np.testing.assert_array_equal(value, reference, err_msg=str(key))


CACHED_VARIANTS = r"""
import sys
import numpy as np
from fastopt.kernels import _build, adam, reduce
x = np.ones(64, np.float32)
order = sys.argv[1]
for parallel in ((False, True) if order == "serial-first" else (True, False)):
    reduce._kernel(parallel)(x, 8)
    rule = adam.ADAM
    args = [np.zeros(64, np.float32) for _ in range(2 + len(rule.state))]
    _build.cpu_kernel(rule, parallel)(*args, np.array([0, 64]), np.ones((1, rule.ncols), np.float32))
"""


def test_serial_and_parallel_variants_have_their_own_cache_entries(tmp_path):
    """Numba's cache ignores ``parallel=``; each variant must be cached under its own name, or
    the one compiled first is loaded for both (found: a parallel reduction running serially)."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", CACHED_VARIANTS, "serial-first"], env=env, check=True, timeout=600)
    names = sorted(f for _, _, files in os.walk(tmp_path) for f in files if f.endswith(".nbi"))
    reduce_entries = [n for n in names if "sumsq_chunks" in n]
    adam_entries = [n for n in names if n.startswith("_build.adam_")]
    assert len(reduce_entries) == 2, names
    assert len(adam_entries) == 2, names
