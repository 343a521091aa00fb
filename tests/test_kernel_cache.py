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
