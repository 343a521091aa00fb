"""``fastopt.bench``: the NumPy baseline does the same work as fastopt, the byte counts follow
from the state buffers, the timing helper times, and bad arguments are refused. Timings here
are tiny smoke runs; their values are only checked to be positive."""

import numpy as np
import pytest

import fastopt as fo
from fastopt import bench

QUICK = {"warmup": 6, "repeats": 1, "min_time": 1e-4}


def test_every_optimizer_class_has_a_spec():
    import fastopt.optimizers

    assert set(fastopt.optimizers.__all__) <= {s.cls for s in bench.SPECS.values()}


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


def _state_arrays(spec, n=16):
    """The optimizer's own state arrays, as the test sees them: those of its parameter's size."""
    opt = getattr(fo, spec.cls)([np.zeros(n, np.float32)], **spec.options)
    return [k for k, v in opt.state[0].items() if isinstance(v, np.ndarray) and v.size == n]


def _traffic_of(kernel, nargs, dtype, rng, n=37):
    """Which arguments ``kernel`` reads (changing them changes what it writes) and writes."""
    base = [rng.standard_normal(n).astype(dtype) for _ in range(nargs)]

    def outputs(arrays):
        arrays = [a.copy() for a in arrays]
        kernel(*arrays)
        return arrays

    after = outputs(base)
    written = {j for j in range(nargs) if not np.array_equal(after[j], base[j])}
    read = set()
    for j in range(nargs):
        changed = [a.copy() for a in base]
        changed[j] += dtype(1)
        out = outputs(changed)
        if any(not np.array_equal(out[w], after[w]) for w in written):
            read.add(j)
    return read, written


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(bench.SPECS))
def test_same_traffic_probe_moves_the_rules_bytes(name, dtype, parallel, rng):
    """For every rule, the probe reads p, g and each of the rule's state buffers and writes p
    and the buffers: (3 + 2k) * itemsize bytes per element, what the row reports."""
    spec = bench.SPECS[name]
    k = len(_state_arrays(spec))
    assert bench.state_buffers(spec, dtype) == k
    read, written = _traffic_of(bench.traffic_kernel(k, parallel), 2 + k, dtype, rng)
    assert read == set(range(2 + k)), "every stream must be read"
    assert written == {0, *range(2, 2 + k)}, "p and the state buffers written, g not"
    assert bench.bytes_per_param(k, dtype) == (len(read) + len(written)) * np.dtype(dtype).itemsize
    arrays = bench.traffic_arrays(k, 1000, dtype)  # no two start at the same offset in a page (4K aliasing)
    assert len({a.ctypes.data % 4096 for a in arrays}) == 2 + k and all(a.size == 1000 for a in arrays)
    row = bench.bench_rule(spec, 500, dtype, numpy=False, torch=False, **QUICK)
    assert row.state_buffers == k
    assert row.bytes_per_param == (len(read) + len(written)) * np.dtype(dtype).itemsize
    assert row.bandwidth == pytest.approx(row.bytes_per_param * row.size / row.probe)
    assert row.roofline == pytest.approx(row.gbps / row.probe_gbps)


def test_probe_is_parallel_where_fastopts_kernel_is(monkeypatch):
    from fastopt.kernels import _build, adam

    for n in (10, 10_000, 100_000, 1_000_000):
        assert bench.traffic_parallel(2, n) == _build.use_parallel(adam.ADAM, n), n
    with pytest.raises(ValueError, match="non-negative"):
        bench.traffic_kernel(-1, False)


def _row(rule="adam", n=10**7, *, fastopt=5e-3, probe=4e-3, spread=0.0, rounds=5, torch=None, impl=None,
         fits=False):
    """A row with synthetic timings: ``spread`` is the IQR over the median of both timings."""
    def rounds_of(t):
        return bench.Spread(t, t * (1 - spread / 2), t * (1 + spread / 2), rounds)

    k = 2 if rule.startswith("adam") else 0
    b = bench.bytes_per_param(k)
    return bench.Row(rule, n, "float32", k, b, b * n / probe, fastopt, None, torch, impl, probe,
                     {"fastopt": rounds_of(fastopt), "probe": rounds_of(probe)}, fits)


def test_row_derived_numbers():
    row = bench.Row("adam", 10**6, "float32", 2, 28, bandwidth=56e9, fastopt=1e-3, numpy=4e-3, torch=2e-3,
                    torch_impl="fused", probe=0.5e-3)
    assert row.mparams_per_s == pytest.approx(1000.0)
    assert row.gbps == pytest.approx(28.0)
    assert row.probe_gbps == pytest.approx(56.0)
    assert row.roofline == pytest.approx(0.5)
    assert row.speedup_numpy == pytest.approx(4.0)
    assert row.speedup_torch == pytest.approx(2.0)
    assert row.footprint_bytes == 4 * 4 * 10**6
    d = row.to_dict()
    assert d["gbps"] == pytest.approx(28.0) and d["torch_impl"] == "fused" and d["noisy"] is None


def test_spread_quartiles():
    s = bench.Spread.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.q1, s.q3, s.rounds) == (3.0, 2.0, 4.0, 5)
    assert s.relative_iqr == pytest.approx(2 / 3)
    assert bench.Spread.of([2.0]).to_dict() == {"median": 2.0, "q1": 2.0, "q3": 2.0, "rounds": 1, "iqr": 0.0,
                                                "relative_iqr": 0.0}
    with pytest.raises(ValueError):
        bench.Spread.of([])


@pytest.mark.parametrize("kwargs, noisy", [
    ({}, None),                                          # 5 ms against a 4 ms probe: 80%, tight rounds
    ({"spread": 0.09}, None),                            # under the threshold
    ({"spread": 0.3}, "spread 30%"),                     # rounds too far apart
    ({"spread": 0.3, "rounds": 2}, None),                # too few rounds to judge a spread
    ({"fastopt": 3e-3}, "133% of a loop with the same traffic"),  # faster than its own traffic
    ({"fastopt": 4.1e-3}, None),                         # 98%: possible
])
def test_noisy_rows_are_flagged_from_their_timings(kwargs, noisy):
    row = _row(**kwargs)
    if noisy is None:
        assert row.noisy is None
    else:
        assert noisy in row.noisy
    report = bench.Report({"cpu": "test", "cores": 2, "llc_bytes": 32 << 20}, "float32", 2, {10**7: row.bandwidth},
                          [row, _row("sgd")])
    table = bench.format_table(report)
    line = next(x for x in table.splitlines() if x.startswith("adam "))
    if noisy is None:
        assert f"{row.roofline:.0%}" in line and "noisy" not in line and "NOISY RUN" not in table
    else:
        assert "noisy" in line and f"{row.roofline:.0%}" not in line.split()[8]
        assert "NOISY RUN: 1 of 2 rows" in table and noisy in table
    d = report.to_dict()
    assert d["noisy"] is (noisy is not None)
    assert d["results"][0]["spreads"]["fastopt"]["rounds"] == row.spreads["fastopt"].rounds


def test_table_and_json_carry_the_new_columns():
    report = bench.run(["sgd", "adam"], [2000, 300_000], "float32", numpy=True, torch=False, warmup=2, repeats=3,
                       min_time=1e-4, llc=1 << 20)
    header = bench.format_table(report).splitlines()[3].split()
    assert header == ["optimizer", "params", "B/param", "cache", "ms/step", "Mparam/s", "GB/s", "probe", "GB/s",
                      "roofline", "spread", "vs", "NumPy", "vs", "torch"]
    d = report.to_dict()
    assert d["machine"]["llc_bytes"] == 1 << 20
    for r, row in zip(d["results"], report.rows):
        for name in ("fastopt", "probe", "numpy"):
            s = r["spreads"][name]
            assert s["rounds"] == 3 and s["q1"] <= s["median"] <= s["q3"]
            assert s["iqr"] == pytest.approx(s["q3"] - s["q1"])
        assert r["fastopt"] == r["spreads"]["fastopt"]["median"]
        assert r["roofline"] == pytest.approx(r["gbps"] / r["probe_gbps"])
        assert r["fits_llc"] is (bench.footprint(r["state_buffers"], r["size"]) <= 1 << 20)
        assert r["noisy"] == row.noisy
    assert [r["fits_llc"] for r in d["results"]] == [True, False, True, False]
    cache_col = [line.split()[3] for line in bench.format_table(report).splitlines()[5:9]]
    assert cache_col == ["LLC", "DRAM", "LLC", "DRAM"]


def test_llc_is_read_from_sysfs(tmp_path):
    for index, (level, kind, size) in enumerate([(1, "Data", "32K"), (1, "Instruction", "32K"), (2, "Unified", "1024K"),
                                                 (3, "Unified", "491520K")]):
        d = tmp_path / f"index{index}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert bench.llc_bytes(str(tmp_path)) == 480 << 20
    assert bench._parse_bytes("32 MiB") == 32 << 20 and bench._parse_bytes("lots") is None


@pytest.mark.parametrize("llc, available, expect", [
    (480 << 20, 64 << 30, 10**8),    # 1e7 Adam (160 MB) fits in 480 MiB: a 1e8 row is added
    (32 << 20, 64 << 30, None),      # 1e7 is already past a 32 MiB cache
    (480 << 20, 2 << 30, None),      # a 1e8 row does not fit in the memory: a note says so
    (None, 64 << 30, None),          # unknown cache: no guess
])
def test_default_plan_adds_a_dram_row_when_the_cache_holds_the_defaults(llc, available, expect):
    p = bench.plan(list(bench.SPECS), None, llc=llc, available=available)
    defaults = [(r, n) for r in bench.SPECS for n in bench.DEFAULT_SIZES]
    assert p.cases[:len(defaults)] == defaults
    assert p.dram_size == expect
    if expect is None:
        assert len(p.cases) == len(defaults)
        if llc is not None and llc > (100 << 20):
            assert any("no DRAM-sized row" in note for note in p.notes)
    else:
        assert p.cases[len(defaults):] == [(r, expect) for r in bench.DRAM_RULES]
        for r in bench.DRAM_RULES:
            assert bench.footprint(bench.state_buffers(bench.SPECS[r]), expect) > llc
    # rules without the DRAM rules: the first rule takes the row
    p = bench.plan(["radam"], None, llc=480 << 20, available=64 << 30)
    assert p.cases == [("radam", 10**5), ("radam", 10**7), ("radam", 10**8)]
    # explicit sizes are run as asked, and refused up front when they cannot fit in memory
    assert bench.plan(["adam"], [10**7], llc=480 << 20, available=64 << 30).cases == [("adam", 10**7)]
    with pytest.raises(ValueError, match="GB available"):
        bench.plan(["adam"], [10**9], llc=None, available=8 << 30)


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
    ({"rules": []}, "at least one"),
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


def test_plain_progress_is_one_line_on_stderr(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)  # import tqdm -> ImportError
    monkeypatch.setattr(bench, "PROGRESS_DELAY", 0.0)
    bench.run(["sgd", "adam"], [100], numpy=False, torch=False, progress=True, **QUICK)
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1 and out.err.endswith("\n")  # one line, rewritten with \r, ended once
    assert "\r" in out.err and "[0/2] sgd n=1e2" in out.err and "[2/2] adam n=1e2" in out.err


def test_progress_waits_before_showing_and_can_be_off(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "tqdm", None)
    monkeypatch.setattr(bench, "PROGRESS_DELAY", 3600.0)  # a run shorter than the delay shows nothing
    bench.run(["sgd"], [100], numpy=False, torch=False, progress=True, **QUICK)
    monkeypatch.setattr(bench, "PROGRESS_DELAY", 0.0)
    bench.run(["sgd"], [100], numpy=False, torch=False, progress=False, **QUICK)
    assert capsys.readouterr().err == ""


def test_progress_uses_tqdm_when_installed(monkeypatch):
    import sys
    import types

    made = []

    class FakeTqdm:
        def __init__(self, **kwargs):
            made.append(kwargs)
            self.updates, self.closed = 0, False

        def set_description(self, label):
            pass

        def update(self, k=1):
            self.updates += k

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "tqdm", types.SimpleNamespace(tqdm=FakeTqdm))
    bar = bench.progress_bar(3)
    assert isinstance(bar, FakeTqdm)
    assert made == [{"total": 3, "unit": "case", "file": sys.stderr, "leave": False, "dynamic_ncols": True,
                     "delay": bench.PROGRESS_DELAY}]


def test_a_rule_torch_lacks_gets_na(monkeypatch):
    pytest.importorskip("torch")
    from fastopt import _numpy_baseline

    monkeypatch.setattr(fo, "NotInTorch", fo.Adam, raising=False)  # a fastopt optimizer torch has no class for
    fake = bench.Spec("not_in_torch", "NotInTorch", {"lr": 1e-3}, _numpy_baseline.Adam)
    monkeypatch.setitem(bench.SPECS, fake.name, fake)
    report = bench.run([fake.name, "sgd"], [1000], numpy=False, torch=True, **QUICK)
    fake_row, sgd_row = report.rows
    assert fake_row.torch is None and fake_row.torch_impl == "n/a"
    assert sgd_row.torch > 0 and sgd_row.torch_impl == "fused"
    lines = bench.format_table(report).splitlines()
    assert next(x for x in lines if x.startswith("not_in_torch")).endswith("n/a")
    assert report.to_dict()["results"][0]["torch_impl"] == "n/a"


def test_plot_labels_and_roofline_ticks_share_the_denominator():
    pytest.importorskip("matplotlib")
    from fastopt import _bench_plot

    # two rules whose probes differ (as they do: each moves its own traffic), one of them noisy
    rows = [_row("sgd", fastopt=2e-3, probe=1.5e-3), _row("adam", fastopt=5e-3, probe=4.5e-3),
            _row("adamw", fastopt=5e-3, probe=4e-3, spread=0.5)]
    report = bench.Report({"cpu": "test", "cores": 2}, "float32", 2, {10**7: rows[1].bandwidth}, rows)
    ax = _bench_plot.figure(report).axes[0]
    bars = sorted(ax.patches, key=lambda p: p.get_y())
    ticks = sorted((line for line in ax.lines if line.get_linestyle() == "--"), key=lambda line: line.get_ydata()[0])
    labels = [t.get_text() for t in sorted(ax.texts, key=lambda t: t.xy[1])]
    assert len(bars) == len(ticks) == len(labels) == 3
    for row, bar_, tick, label in zip(rows, bars, ticks, labels):
        x0, x1 = tick.get_xdata()
        assert x0 == x1 == pytest.approx(row.probe_gbps)
        assert bar_.get_width() == pytest.approx(row.gbps)
        assert label == ("noisy" if row.noisy else f"{bar_.get_width() / x0:.0%}")
        assert label == bench.format_table(report).split(f"\n{row.rule} ")[1].split()[7]  # the table's column


def test_torch_picks_fused_where_it_exists():
    pytest.importorskip("torch")
    p = np.zeros(10, np.float32)
    g = np.ones(10, np.float32)
    for name, expected in [("adam", "fused"), ("sgd_momentum", "fused"), ("adagrad", "fused"),
                           ("rmsprop", "foreach"), ("radam", "foreach")]:
        _, impl = bench._torch_optimizer(bench.SPECS[name], p.copy(), g)
        assert impl == expected, name


def test_every_benchmark_records_its_throughput(tmp_path):
    """Run every benchmark in bench/ (and the example for users) timed, at smoke sizes, and
    read pytest-benchmark's JSON: each records params/s, GB/s and its roofline fraction
    (``None`` only where it names no same-traffic loop), except the startup latency."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "bench.json"
    env = {**os.environ, "FASTOPT_BENCH_SIZES": "3000", "PYTHONPATH": root}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench",
           "--benchmark-enable", "--benchmark-min-rounds=3", "--benchmark-max-time=0.002", "--benchmark-warmup=off",
           f"--benchmark-json={out}"]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    benchmarks = json.loads(out.read_text())["benchmarks"]
    files = {b["fullname"].split("::")[0] for b in benchmarks}
    assert {"bench/test_bench_optimizers.py", "bench/test_bench_threshold.py", "bench/test_bench_noise.py",
            "bench/test_bench_transforms.py", "bench/test_bench_flat.py", "bench/test_bench_startup.py",
            "bench/test_user_example.py"} <= files
    for b in benchmarks:
        info = b["extra_info"]
        if b["group"] == "startup":
            assert info["first_step_s"] > 0
            continue
        for key in ("params", "bytes_per_param", "params_per_s", "gb_per_s", "roofline", "probe_gb_per_s"):
            assert key in info, (b["fullname"], key)
        assert info["params_per_s"] > 0 and info["gb_per_s"] > 0, b["fullname"]
        assert info["gb_per_s"] == pytest.approx(info["bytes_per_param"] * info["params_per_s"] / 1e9)
        if info["roofline"] is None:
            assert info["state_buffers"] is None and info["roofline_against"].startswith("none"), b["fullname"]
        else:
            assert info["roofline"] == pytest.approx(info["gb_per_s"] / info["probe_gb_per_s"])
