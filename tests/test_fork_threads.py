"""fork() and threads: a forked child computes what its parent would, under every threading layer,
without being killed or hanging (``fastopt.kernels._threads``); threads sharing one optimizer
get the result of as many serial steps, and a save during steps is one consistent checkpoint
(``fastopt._locking``).

The process tests run ``tests/fork_threads_worker.py`` in a fresh interpreter per threading
layer, under a timeout, so a regression (a killed child, a hung pool) fails instead of hanging.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import threading

import numba
import numpy as np
import pytest

import fastopt as fo
from fastopt import _locking
from fastopt.kernels import _config, _threads

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "fork_threads_worker.py")
TIMEOUT = 420  # seconds for one worker run (first compilations included), a hang fails the test

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX only")


def _tbb_usable() -> bool:
    """Whether Numba's TBB layer can start here (the tbb package, and a compatible version)."""
    code = ("import numba, numpy as np\nimport fastopt\n"
            "@numba.njit(parallel=True)\ndef f(x):\n    for i in numba.prange(x.size): x[i] += 1\n"
            "f(np.zeros(4)); print(numba.threading_layer())")
    env = _env("tbb")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return out.returncode == 0 and out.stdout.strip() == "tbb"


def _env(layer: str | None) -> dict:
    env = dict(os.environ)
    env.pop("NUMBA_THREADING_LAYER", None)
    if layer is not None:
        env["NUMBA_THREADING_LAYER"] = layer
    root = os.path.dirname(os.path.dirname(os.path.abspath(fo.__file__)))  # the fastopt under test
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["NUMBA_NUM_THREADS"] = "2"  # two threads even on one core: the parallel kernels really run parallel
    return env


LAYERS = [None, "omp", "workqueue", "tbb"]  # None: Numba's choice (tbb when installed, else omp)
_reports: dict = {}


@pytest.fixture(scope="module", params=LAYERS, ids=lambda p: p or "default")
def report(request):
    layer = request.param
    if layer == "tbb" and not _tbb_usable():
        pytest.skip("Numba's TBB layer is not available here (pip install tbb)")
    if layer not in _reports:
        try:
            out = subprocess.run([sys.executable, WORKER], env=_env(layer), capture_output=True, text=True,
                                 timeout=TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"the fork/threads worker under layer {layer} hung for {TIMEOUT} s:\n{exc.stderr}")
        assert out.returncode == 0, f"worker under layer {layer} died ({out.returncode}):\n{out.stderr[-3000:]}"
        _reports[layer] = json.loads(out.stdout)
    return _reports[layer]


#: Cases whose serial and parallel kernels may differ in the last bits here: the serial noise kernel
#: loaded from Numba's on-disk cache differs from a fresh compile (issue 11, the kernel-cache part;
#: without the cache, FASTOPT_NO_CACHE=1, they agree bit for bit). Empty this set once that is fixed.
CACHE_INEXACT = {"adamw_noise"}


def _same(name: str, got: list, want: list) -> bool:
    """Bit for bit (the SHA-256), or for CACHE_INEXACT cases the same sums to 1e-6."""
    if got[0] == want[0]:
        return True
    return name in CACHE_INEXACT and np.allclose(got[1], want[1], rtol=1e-6, atol=0)


def _all_same(got: dict, want: dict) -> bool:
    return set(got) == set(want) and all(_same(k, got[k], want[k]) for k in want)


def _expect_serial(report, from_thread: bool) -> bool:
    """Whether a child forked after the parent's parallel steps must run serially."""
    layer = report["layer"]
    return layer in _threads.FORK_UNSAFE or (layer == "tbb" and from_thread)


def test_the_layer_asked_for_is_the_layer_used(report):
    if report["requested"] != "default":  # a user's explicit NUMBA_THREADING_LAYER is respected
        assert report["layer"] == report["requested"]
        if report["requested"] in ("omp", "workqueue"):
            assert report["tbb_preloaded"] is None
    elif _threads.tbb_library() is not None:  # the tbb package is installed: Numba's default finds it
        assert report["layer"] == "tbb", "fastopt did not make Numba's TBB layer find the tbb package"
        assert report["tbb_preloaded"]
    assert report["fork_safe"] == (report["layer"] not in _threads.FORK_UNSAFE)


def test_fork_pool_workers_compute_the_parents_numbers(report):
    """A fork-start multiprocessing.Pool created after parallel steps: every worker steps fresh
    optimizers (update, noise and norm kernels, FlatParams, the functional API) and gets the
    parent's numbers bit for bit."""
    results = report["pool"]
    assert isinstance(results, list), f"the pool failed: {results}"
    assert {r["name"] for r in results} == set(report["parent"])
    for r in results:
        assert _same(r["name"], r["digest"], report["parent"][r["name"]]), f"pool worker differs on {r['name']}"
        assert r["pid"] != os.getpid()
        assert bool(r["serial_only"]) == _expect_serial(report, from_thread=False)


@pytest.mark.parametrize("part", ["fork", "thread_fork"])
def test_bare_fork_child_computes_the_parents_numbers(report, part):
    """os.fork() from the main thread, and from a second thread: the child exits normally, with
    the parent's numbers; when it must run serially it says so, once."""
    child = report[part]
    assert "error" not in child, child
    assert child["status"] == 0
    assert _all_same(child["digests"], report["parent"])
    assert _all_same(child["again"], report["parent"])
    serial = _expect_serial(report, from_thread=part == "thread_fork")
    assert bool(child["serial_only"]) == serial
    assert len(child["warnings"]) == (1 if serial else 0), child["warnings"]


def test_two_threads_stepping_two_optimizers_at_once(report):
    """Concurrent parallel launches from two threads (workqueue would abort the process; fastopt
    serializes its launches there) give each optimizer its serial numbers."""
    results = report["two_threads"]
    assert "error" not in results, results
    for name, digests in results.items():
        assert all(_same(name, d, report["parent"][name]) for d in digests)


def test_a_child_forked_before_any_parallel_step_runs_parallel():
    """Forking before the parent started a threading layer leaves the child free to start one."""
    code = ("import os, json, numpy as np, fastopt as fo\nfrom fastopt.kernels import _config, _threads\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    p = np.zeros(4 * _config.PARALLEL_MIN_WORK, np.float32)\n"
            "    fo.Adam([p]).step([np.ones_like(p)])\n"
            "    os._exit(0 if _threads.state.serial_only is None and _threads.state.layer else 3)\n"
            "print(json.dumps(os.waitpid(pid, 0)[1]))")
    out = subprocess.run([sys.executable, "-c", code], env=_env(None), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == 0, out.stderr


# -- threads sharing one optimizer ------------------------------------------------------------

def _adam_problem(n: int, flat: bool):
    rng = np.random.default_rng(7)
    if flat:
        params = fo.FlatParams({"w": n - 10, "b": 10})
        params.buffer[...] = rng.standard_normal(params.buffer.size).astype(np.float32)
        opt = fo.Adam(params, lr=1e-2, clip_grad_norm=1.0, grad_noise=(0.01, 0.55), seed=1)
        grad = params.zeros_like()
        grad.buffer[...] = rng.standard_normal(grad.buffer.size).astype(np.float32)
        return opt, [params.buffer], grad
    ps = [rng.standard_normal(n).astype(np.float32), rng.standard_normal(100).astype(np.float32)]
    opt = fo.Adam(ps, lr=1e-2, clip_grad_norm=1.0, grad_noise=(0.01, 0.55), seed=1)
    return opt, ps, [np.ones(n, np.float32), np.full(100, 0.5, np.float32)]


def _snapshot(opt, params) -> list[np.ndarray]:
    sd = opt.state_dict()
    return [p.copy() for p in params] + [v for e in sd["state"].values() for v in e.values()
                                         if isinstance(v, np.ndarray)]


@pytest.mark.parametrize("flat", [False, True], ids=["arrays", "flat"])
@pytest.mark.parametrize("n", [1000, 4 * _config.PARALLEL_MIN_WORK], ids=["serial", "parallel"])
def test_threads_hammering_one_optimizer_equal_serial_steps(n, flat):
    threads, steps = 4, 25
    opt, params, grad = _adam_problem(n, flat)
    ref, ref_params, ref_grad = _adam_problem(n, flat)
    for _ in range(threads * steps):
        ref.step(ref_grad)
    barrier = threading.Barrier(threads)
    errors = []

    def work():
        try:
            barrier.wait()
            for _ in range(steps):
                opt.step(grad)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in pool)
    assert opt.step_count == ref.step_count == threads * steps
    for got, want in zip(_snapshot(opt, params), _snapshot(ref, ref_params)):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("flat", [False, True], ids=["arrays", "flat"])
def test_save_and_state_dict_during_steps_are_consistent(tmp_path, flat):
    """Checkpoints and state dicts taken while another thread steps each hold one step's
    parameters and state: those of the serial run after the step count they record."""
    n, steps = _config.PARALLEL_MIN_WORK, 60
    opt, params, grad = _adam_problem(n, flat)
    ref, ref_params, ref_grad = _adam_problem(n, flat)
    history = [_snapshot(ref, ref_params)]
    for _ in range(steps):
        ref.step(ref_grad)
        history.append(_snapshot(ref, ref_params))
    done = threading.Event()

    def train():
        try:
            for _ in range(steps):
                opt.step(grad)
        finally:
            done.set()

    trainer = threading.Thread(target=train)
    taken = []
    trainer.start()
    i = 0
    while not done.is_set() or i < 2:
        path = tmp_path / f"ckpt{i}.npz"
        fo.save(opt, path)
        sd = opt.state_dict()
        taken.append((path, sd["step_count"], [v for e in sd["state"].values() for v in e.values()
                                               if isinstance(v, np.ndarray)]))
        i += 1
    trainer.join(120)
    assert not trainer.is_alive()
    for path, count, buffers in taken:
        want = history[count]
        for got, exp in zip(buffers, want[len(params):]):
            np.testing.assert_array_equal(got, exp)
        fresh, fresh_params, _ = _adam_problem(n, flat)
        fo.load(fresh, path)
        k = fresh.step_count
        for got, exp in zip(_snapshot(fresh, fresh_params), history[k]):
            np.testing.assert_array_equal(got, exp, err_msg=f"checkpoint at step {k} is torn")


def test_lock_is_per_optimizer_reentrant_and_renewed_after_fork():
    a, b = fo.SGD([np.zeros(4)], lr=0.1), fo.SGD([np.zeros(4)], lr=0.1)
    assert _locking.lock_of(a) is _locking.lock_of(a)
    assert _locking.lock_of(a) is not _locking.lock_of(b)
    with _locking.lock_of(a):  # a deep copy (as before there were locks) gets its own, free lock
        c = copy.deepcopy(a)
        assert _locking.lock_of(c) is not _locking.lock_of(a)
        free = []

        def try_c():  # from another thread: a's lock is held, c's must not be
            lock = _locking.lock_of(c)
            free.append(lock.acquire(blocking=False))
            if free[-1]:
                lock.release()

        t = threading.Thread(target=try_c)
        t.start()
        t.join(60)
        assert free == [True]
    held, release = threading.Event(), threading.Event()

    def hold():  # another thread holds a's lock across the fork
        with _locking.lock_of(a):
            held.set()
            release.wait(60)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(60)
    try:
        with _locking.lock_of(b):  # re-entrant: b's state_dict inside b's lock
            b.state_dict()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # in the child the holder does not exist: a's lock must be free
            try:
                ok = _locking.lock_of(a).acquire(timeout=10)
                if ok:
                    a.step([np.ones(4)])
                os.write(w, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(w)
        import select

        ready, _, _ = select.select([r], [], [], 60)
        got = os.read(r, 1) if ready else b""
        os.close(r)
        if not ready:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
        assert got == b"1", "a forked child inherited a lock held by another thread"
    finally:
        release.set()
        t.join(60)


def test_numba_reports_the_layer_fastopt_expects():
    """In this interpreter: after a parallel step, numba.threading_layer() is TBB when the tbb
    package is installed and no other layer was asked for."""
    p = np.zeros(4 * _config.PARALLEL_MIN_WORK, np.float32)
    fo.Adam([p]).step([np.ones_like(p)])
    layer = numba.threading_layer()
    if os.environ.get("NUMBA_THREADING_LAYER", "default") == "default" and _threads.state.tbb_preloaded:
        assert layer == "tbb"
    assert _threads.fork_safe() == (layer not in _threads.FORK_UNSAFE)
