"""The ``fastopt`` command: ``info`` runs (also as the installed console script), ``bench``
writes a table, JSON and a picture with sane values, ``demo`` writes its pictures, and bad
arguments exit with status 2 and a message that says what was expected."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fastopt import cli
from fastopt.kernels import _threads


def run_cli(capsys, *argv):
    status = cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def fails(capsys, *argv) -> str:
    """Run the command, expect argparse's exit status 2, return stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_console_script_info():
    script = shutil.which("fastopt", path=os.path.dirname(sys.executable))
    if script is None:
        pytest.skip("the fastopt console script is not installed beside this Python")
    result = subprocess.run([script, "info"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    for text in ("fastopt 0.1.0", "numba", "llvmlite", "threading", "cache", "cuda"):
        assert text in result.stdout


def test_info_json(capsys):
    import numba
    import numpy as np

    status, out, _ = run_cli(capsys, "info", "--json")
    assert status == 0
    info = json.loads(out)
    assert info["versions"]["numpy"] == np.__version__
    assert info["versions"]["numba"] == numba.__version__
    assert info["threading"]["threads"] == numba.get_num_threads()
    assert info["threading"]["layer"] in ("tbb", "omp", "workqueue")
    assert info["threading"]["fork_safe"] == (info["threading"]["layer"] not in _threads.FORK_UNSAFE)
    assert isinstance(info["cache"]["enabled"], bool)
    assert info["cuda"]["available"] in (True, False)
    if not info["cuda"]["available"]:
        assert info["cuda"]["reason"]


def test_bench_json_table_and_plot(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    out_png = tmp_path / "bench.png"
    argv = ["bench", "--sizes", "1000", "--rules", "adam,sgd", "--json", str(out_json), "--repeats", "2",
            "--quiet"]
    have_plot = cli._have("matplotlib")
    if have_plot:
        argv += ["--plot", str(out_png)]
    status, out, _ = run_cli(capsys, *argv)
    assert status == 0
    assert "adam" in out and "sgd" in out and "roofline" in out

    data = json.loads(out_json.read_text())
    assert data["dtype"] == "float32"
    assert data["machine"]["cpu"] and data["machine"]["cores"] >= 1
    assert [b["size"] for b in data["bandwidth"]] == [1000] and data["bandwidth"][0]["gbps"] > 0
    rows = {r["rule"]: r for r in data["results"]}
    assert set(rows) == {"adam", "sgd"}
    assert rows["adam"]["bytes_per_param"] == 28 and rows["sgd"]["bytes_per_param"] == 12
    torch_installed = cli._have("torch")
    for r in rows.values():
        assert r["size"] == 1000
        for key in ("fastopt", "mparams_per_s", "gbps", "roofline", "numpy", "speedup_numpy"):
            assert r[key] > 0, key
        assert r["gbps"] == pytest.approx(r["bytes_per_param"] * r["mparams_per_s"] / 1e3)
        assert r["roofline"] == pytest.approx(r["gbps"] / r["probe_gbps"])  # the same-traffic probe's
        for name in ("fastopt", "probe", "numpy"):
            spread = r["spreads"][name]
            assert spread["rounds"] == 2 and spread["q1"] <= spread["median"] <= spread["q3"]
        assert r["fits_llc"] in (True, False, None) and "noisy" in r
        if torch_installed:
            assert r["torch"] > 0 and r["torch_impl"] == "fused"
    if have_plot:
        with open(out_png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, message", [
    (["bench", "--sizes", "1x"], "invalid size '1x'"),
    (["bench", "--sizes", "0"], "must be at least 1"),
    (["bench", "--sizes", "2.5"], "invalid size"),
    (["bench", "--rules", "adam,adamm"], "unknown optimizer(s) adamm"),
    (["bench", "--dtype", "float16"], "invalid choice: 'float16'"),
    (["bench", "--threads", "0"], "expected a positive integer"),
    (["bench", "--threads", "4096"], "at most"),
    (["bench", "--repeats", "x"], "expected a positive integer"),
    (["bench", "--json", "/nonexistent-dir/b.json"], "does not exist"),
    (["bench", "--bogus"], "unrecognized arguments: --bogus"),
    (["bench", "--sizes", "1e13", "--rules", "adam"], "GB available"),  # refused before anything is allocated
    (["benchmark"], "invalid choice: 'benchmark'"),
    ([], "required"),
])
def test_bad_arguments_exit_2_with_a_message(capsys, argv, message):
    assert message in fails(capsys, *argv)


class _Stderr:
    """A stand-in for sys.stderr that says whether it is a terminal."""

    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, text):
        self.text += text

    def flush(self):
        pass


@pytest.mark.parametrize("tty, quiet, shown", [(True, False, True), (True, True, False), (False, False, False)])
def test_bench_progress_only_on_a_terminal_and_not_quiet(capsys, monkeypatch, tty, quiet, shown):
    from fastopt import bench

    monkeypatch.setitem(sys.modules, "tqdm", None)  # the one-line counter
    monkeypatch.setattr(bench, "PROGRESS_DELAY", 0.0)
    err = _Stderr(tty)
    monkeypatch.setattr(sys, "stderr", err)
    argv = ["bench", "--sizes", "100", "--rules", "sgd", "--repeats", "1", "--no-torch", "--no-numpy"]
    status = cli.main(argv + (["--quiet"] if quiet else []))
    assert status == 0
    assert ("[1/1] sgd n=1e2" in err.text) is shown
    assert "sgd" in capsys.readouterr().out


def test_plot_without_matplotlib_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_have", lambda module: module != "matplotlib")
    err = fails(capsys, "bench", "--sizes", "100", "--rules", "sgd", "--plot", str(tmp_path / "b.png"))
    assert "needs matplotlib" in err and "pip install 'fastopt[plot]'" in err
    assert not (tmp_path / "b.png").exists()


def test_sizes_accept_the_usual_spellings():
    assert cli.parse_sizes("1000,1e6,2**20,2^10,1_000") == [1000, 10**6, 2**20, 1024, 1000]
    assert cli.parse_rules("Adam, sgd-momentum") == ["adam", "sgd_momentum"]
    assert len(cli.parse_rules("all")) == 10


def test_demo_writes_the_pictures(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    status, out, _ = run_cli(capsys, "demo", "--out", str(tmp_path))
    assert status == 0
    for name in ("trajectories.png", "mlp_digits.png"):
        path = tmp_path / name
        assert f"wrote {path}" in out
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
