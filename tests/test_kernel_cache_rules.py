"""A kernel loaded from Numba's on-disk cache computes bit for bit what the same kernel compiled
in-process computes, serial or parallel. (Seen once: with ``arcp`` and a division by a
per-segment scalar in an element function, the cached parallel RAdam kernel multiplied by the
reciprocal and the in-process one divided, 1 ulp apart. The element functions now divide only
by per-element values, which ``arcp`` leaves alone; this keeps it so.)"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from fastopt.kernels import _build, _config, adam, nadam, radam

    n = 3 * _config.CHUNK + 17
    rng = np.random.default_rng(0)
    out = []
    for rule in (adam.ADAM, radam.MOMENTUM_PHASE, radam.ADAPTIVE_PHASE, nadam.NADAM):
        arrays = [rng.standard_normal(n).astype(np.float32) for _ in range(2 + len(rule.state))]
        arrays[2:] = [abs(a) for a in arrays[2:]]
        table = rng.uniform(0.1, 0.9, (1, rule.ncols)).astype(np.float32)
        bounds = np.array([0, n], np.int64)
        for parallel in (False, True):
            a = [x.copy() for x in arrays]
            _build.cpu_kernel(rule, parallel)(*a, bounds, table)
            out.append(a[0])
    np.save(sys.argv[1], np.stack(out))
    print(json.dumps({"cache": _config.cache_enabled()}))
    """
)


def test_cached_kernels_give_the_numbers_of_freshly_compiled_ones(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("FASTOPT_NO_CACHE", None)
    runs = []
    for i in range(2):  # the first compiles and writes the cache, the second loads it
        out = tmp_path / f"run{i}.npy"
        proc = subprocess.run([sys.executable, str(script), str(out)], env=env, capture_output=True, text=True,
                              check=True)
        assert json.loads(proc.stdout.strip().splitlines()[-1])["cache"]
        runs.append(np.load(out))
    assert any((tmp_path / "cache").rglob("*.nbi")), "nothing was cached: the test would prove nothing"
    fresh, cached = runs  # rows: (serial, parallel) for each rule
    np.testing.assert_array_equal(fresh[0::2], fresh[1::2])  # serial == parallel, compiled in-process
    np.testing.assert_array_equal(cached, fresh)  # loaded from the cache == compiled
