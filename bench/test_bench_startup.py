"""A second process's first step with the kernel cache warm (target: 0.5 s or less).

    pytest bench/test_bench_startup.py --benchmark-enable

Times ``import fastopt`` + building an Adam optimizer + its first step, in a fresh
interpreter, after one process has filled Numba's cache. Also reports the import alone.
A latency, not a throughput: ``extra_info`` has the two times (no parameters/s or roofline).
"""

import os
import subprocess
import sys
import textwrap

FIRST_STEP = textwrap.dedent("""
    import time
    t0 = time.perf_counter()
    import numpy as np, fastopt as fo
    t1 = time.perf_counter()
    w = np.zeros(1000, np.float32)
    fo.Adam([w], lr=1e-3).step([np.ones_like(w)])
    t2 = time.perf_counter()
    print(t1 - t0, t2 - t1)
""")


def _run(cache_dir):
    out = subprocess.run([sys.executable, "-c", FIRST_STEP], capture_output=True, text=True, check=True, timeout=300,
                         env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)})
    return [float(x) for x in out.stdout.split()]


def test_second_process_first_step(benchmark, tmp_path):
    benchmark.group = "startup"
    _run(tmp_path)  # fills the cache
    import_s, first_step_s = benchmark.pedantic(_run, args=(tmp_path,), rounds=5, iterations=1)
    benchmark.extra_info.update(import_s=import_s, first_step_s=first_step_s)
    assert first_step_s > 0
