"""``fastopt.bench``: the NumPy baseline does the same work as fastopt, the byte counts follow
from the state buffers, the timing helper times, and bad arguments are refused. Timings here
are tiny smoke runs; their values are only checked to be positive."""

import numpy as np
import pytest

import fastopt as fo
from fastopt import bench

#: Bytes per float32 parameter of a fused step: (3 + 2 * state buffers) * 4.
EXPECTED_BYTES = {"sgd": 12, "sgd_momentum": 20, "adagrad": 20, "adadelta": 28, "rmsprop": 20,
                  "adam": 28, "adamw": 28, "adamax": 28, "nadam": 28, "radam": 28}
QUICK = {"warmup": 6, "repeats": 1, "min_time": 1e-4}


def test_every_optimizer_has_a_spec():
    assert set(bench.SPECS) == set(EXPECTED_BYTES)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(bench.SPECS))
def test_numpy_baseline_matches_fastopt(name, dtype, rng):
    """Eight steps (RAdam switches to its adaptive phase at step 6) of the NumPy baseline and
    of the fastopt class with the benchmark's options: parameters and every state buffer."""
    spec = bench.SPECS[name]
    p0 = rng.standard_normal(301).astype(dtype)
    w, ref = p0.copy(), p0.copy()
    opt = getattr(fo, spec.cls)([w], **spec.options)
    base = spec.baseline(ref, **spec.options)
    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == np.float32 else {"rtol": 1e-11, "atol": 1e-13}
    for t in range(1, 9):
        g = (rng.standard_normal(301) * np.exp(rng.uniform(-3, 1, 301))).astype(dtype)
        opt.step([g])
        base.step(g)
        assert ref.dtype == dtype
        np.testing.assert_allclose(ref, w, **tol, err_msg=f"{name} param after step {t}")
    state = opt.state[0]
    buffers = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    assert set(buffers) == set(base.state_names)
    for k, v in buffers.items():
        np.testing.assert_allclose(getattr(base, k), v, **tol, err_msg=f"{name} state {k}")


def test_bytes_per_param_follow_the_state_buffers():
    for name, expected in EXPECTED_BYTES.items():
        row = bench.bench_rule(bench.SPECS[name], 1000, np.float32, numpy=False, torch=False, **QUICK)
        assert row.bytes_per_param == expected, name
        assert row.state_buffers == (expected // 4 - 3) // 2
        assert row.bandwidth > 0 and row.fastopt > 0
    row = bench.bench_rule(bench.SPECS["adam"], 1000, np.float64, numpy=False, torch=False, **QUICK)
    assert row.bytes_per_param == 56


def test_row_derived_numbers():
    row = bench.Row("adam", 10**6, "float32", 2, 28, bandwidth=56e9, fastopt=1e-3, numpy=4e-3, torch=2e-3,
                    torch_impl="fused")
    assert row.mparams_per_s == pytest.approx(1000.0)
    assert row.gbps == pytest.approx(28.0)
    assert row.roofline == pytest.approx(0.5)
    assert row.speedup_numpy == pytest.approx(4.0)
    assert row.speedup_torch == pytest.approx(2.0)
    d = row.to_dict()
    assert d["gbps"] == pytest.approx(28.0) and d["torch_impl"] == "fused"


def test_time_per_call_warms_up_then_times():
    calls = []

    def fn():
        calls.append(1)

    seconds = bench.time_per_call(fn, warmup=3, repeats=4, min_time=1e-3)
    assert seconds > 0
    assert len(calls) > 3 + 4  # warm-up, then runs long enough to reach min_time


def test_time_interleaved_times_every_function_in_turns():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    seconds = bench.time_interleaved(fns, warmup=2, repeats=3, min_time=0.0)
    assert set(seconds) == {"a", "b"} and all(s > 0 for s in seconds.values())
    # warm-up and calibration one function after the other, then rounds that alternate
    assert order == ["a"] * 3 + ["b"] * 3 + ["a", "b", "a", "b"]


def test_measure_bandwidth_is_positive():
    assert bench.measure_bandwidth(10_000, np.float32, repeats=2, min_time=1e-3) > 0
    assert bench.measure_bandwidth(100_000, np.float64, repeats=2, min_time=1e-3) > 0  # parallel kernel


def test_run_and_table():
    report = bench.run(["sgd", "adam"], [2000], "float32", numpy=True, torch=False, **QUICK)
    assert [r.rule for r in report.rows] == ["sgd", "adam"]
    assert report.bandwidth[2000] == np.median([r.bandwidth for r in report.rows]) > 0
    for r in report.rows:
        assert r.fastopt > 0 and r.numpy > 0 and r.torch is None
    table = bench.format_table(report)
    for text in ("optimizer", "Mparam/s", "GB/s", "roofline", "vs NumPy", "sgd", "adam", "2,000"):
        assert text in table
    assert report.to_dict()["results"][1]["bytes_per_param"] == 28


def test_run_restores_the_thread_count():
    import numba

    before = numba.get_num_threads()
    report = bench.run(["sgd"], [100], threads=1, numpy=False, torch=False, **QUICK)
    assert report.threads == 1
    assert numba.get_num_threads() == before


@pytest.mark.parametrize("kwargs, message", [
    ({"rules": ["adamm"]}, "unknown rule"),
    ({"dtype": "float16"}, "dtype"),
    ({"sizes": [0]}, "sizes"),
    ({"sizes": []}, "sizes"),
    ({"threads": 0}, "threads"),
    ({"threads": 10**6}, "threads"),
])
def test_run_refuses_bad_arguments(kwargs, message):
    args = {"rules": ["sgd"], "sizes": [100], **kwargs}
    with pytest.raises(ValueError, match=message):
        bench.run(**args, numpy=False, torch=False, **QUICK)


def test_plain_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # import tqdm -> ImportError
    bench.run(["sgd"], [100], numpy=False, torch=False, progress=True, **QUICK)
    err = capsys.readouterr().err
    assert "[1/1] sgd, n=1e+02" in err


def test_torch_picks_fused_where_it_exists():
    pytest.importorskip("torch")
    p = np.zeros(10, np.float32)
    g = np.ones(10, np.float32)
    for name, expected in [("adam", "fused"), ("sgd_momentum", "fused"), ("adagrad", "fused"),
                           ("rmsprop", "foreach"), ("radam", "foreach")]:
        _, impl = bench._torch_optimizer(bench.SPECS[name], p.copy(), g)
        assert impl == expected, name
