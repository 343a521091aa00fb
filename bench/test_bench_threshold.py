"""Serial vs parallel kernel around the switch point (``_config.PARALLEL_MIN_WORK``).

    pytest bench/test_bench_threshold.py --benchmark-enable --benchmark-group-by=group

Each group ``threshold|rule|n`` holds the serial and the parallel kernel on the same buffer;
the switch should sit where the parallel one starts to win. ``extra_info``: parameters/s, GB/s
and the fraction of the same-traffic loop run the same way (serial or parallel).
"""

import numpy as np
import pytest

from fastopt.bench import record_throughput as record
from fastopt.kernels import _build, adam, sgd

SIZES = [1 << k for k in (12, 14, 16, 18)]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("rule", [sgd.SGD, adam.ADAM], ids=lambda r: r.name)
@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_kernel(benchmark, rule, n, parallel):
    benchmark.group = f"threshold|{rule.name}|{n}"
    kernel = _build.cpu_kernel(rule, parallel)
    dt = np.float32
    args = (np.zeros(n, dt), np.ones(n, dt), *[np.ones(n, dt) for _ in rule.state],
            np.array([0, n], np.int64), np.full((1, rule.ncols), 0.5, dt))
    kernel(*args)
    benchmark(kernel, *args)
    record(benchmark, n, state_buffers=len(rule.state), parallel=parallel)
    assert np.isfinite(args[0]).all()
