"""Run by ``tests/test_fork_threads.py`` in a fresh interpreter, under the threading layer the
test sets (``NUMBA_THREADING_LAYER``): the parent runs parallel steps, then forks (a fork-start
``multiprocessing.Pool``, a bare ``os.fork()``, a fork from a second thread) and every child
steps fresh optimizers; two threads also step two optimizers at once. Prints one JSON report:
for each case, a digest of the parameters and state after its steps, as the parent and each
child computed it, and what each child ran (parallel or serial, warnings).

Every wait has a timeout, so a hang becomes an error in the report (and the test's subprocess
timeout is the last resort).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import threading
import warnings

import numba
import numpy as np

import fastopt as fo
from fastopt import kernels
from fastopt.kernels import _config, _threads

#: Elements: every rule's update, the noise kernel and the norm reduction take the parallel path.
N = 4 * _config.PARALLEL_MIN_WORK
STEPS = 3
WAIT = 120  # seconds any child or thread may take


def _grads(seed: int, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _params(seed: int, *shapes):
    rng = np.random.default_rng(1000 + seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _digest(arrays) -> list:
    """A SHA-256 of the arrays' bytes (equal results are equal bit for bit) and each array's
    float64 sum (to tell a last-bit difference from a wrong result)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return [h.hexdigest(), [float(np.sum(a, dtype=np.float64)) for a in arrays]]


def _optimizer_digest(opt, params) -> list:
    sd = opt.state_dict()
    bufs = [v for entry in sd["state"].values() for v in entry.values() if isinstance(v, np.ndarray)]
    return _digest(list(params) + bufs)


def case_adam():  # a parallel-size and a serial-size parameter
    ps = _params(0, N, 100)
    opt = fo.Adam(ps, lr=1e-2)
    for t in range(STEPS):
        opt.step(_grads(t, N, 100))
    return _optimizer_digest(opt, ps)


def case_sgd_clip():  # the norm reduction (parallel) and SGD with momentum
    ps = _params(1, N)
    opt = fo.SGD(ps, lr=0.1, momentum=0.9, clip_grad_norm=0.5)
    for t in range(STEPS):
        opt.step(_grads(t, N))
    return _optimizer_digest(opt, ps)


def case_adamw_noise():  # the noise kernel (parallel)
    ps = _params(2, N)
    opt = fo.AdamW(ps, lr=1e-2, grad_noise=(0.01, 0.55), seed=3)
    for t in range(STEPS):
        opt.step(_grads(t, N))
    return _optimizer_digest(opt, ps)


def case_flat():  # a FlatParams: one launch over two tensors
    flat = fo.FlatParams({"w": (N // 64, 64), "b": 64})
    flat["w"][...] = _params(3, (N // 64, 64))[0]
    opt = fo.Adam(flat, lr=1e-2, clip_grad_norm=1.0)
    g = flat.zeros_like()
    for t in range(STEPS):
        g.buffer[...] = 0.0
        g["w"][...] = _grads(t, (N // 64, 64))[0]
        opt.step(g)
    return _optimizer_digest(opt, [flat.buffer])


def case_functional():  # fastopt.kernels.adam_step on the user's own buffers
    (p,) = _params(4, N)
    state = kernels.init_state("adam", p)
    for t in range(STEPS):
        kernels.adam_step(p, _grads(t, N)[0], state, step=t + 1, lr=1e-2)
    return _digest([p, state["exp_avg"], state["exp_avg_sq"]])


def case_bench_probe():  # fastopt bench's bandwidth probe, a parallel kernel of its own
    from fastopt.bench import axpy_kernel

    x, y = _params(5, N, N)
    for _ in range(STEPS):
        axpy_kernel(True)(x, y, np.float32(0.5))
    return _digest([x])


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}


def run_all() -> dict:
    """Every case, with what this process ran them on and the fastopt warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        digests = {name: fn() for name, fn in CASES.items()}
        digests_again = {name: fn() for name, fn in CASES.items()}  # the warning comes once per process
    ours = [str(w.message) for w in caught if "fastopt" in str(w.message)]
    return {"pid": os.getpid(), "digests": digests, "again": digests_again, "warnings": ours,
            "serial_only": _threads.state.serial_only}


def _child_case(name: str) -> dict:
    return {"name": name, "digest": CASES[name](), "pid": os.getpid(), "serial_only": _threads.state.serial_only}


def _in_forked_child(result_fd_pair) -> int:
    """Fork; the child runs every case and writes its report to a pipe. The parent's view:
    the child's exit status and report."""
    r, w = result_fd_pair
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            data = json.dumps(run_all()).encode()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, never raised past fork
            data = json.dumps({"error": repr(exc)}).encode()
            code = 1
        os.write(w, data)
        os.close(w)
        os._exit(code)
    return pid


def forked(from_thread: bool) -> dict:
    """A bare fork() (from the main thread, or from a second thread), waited on with a timeout."""
    r, w = os.pipe()
    box = {}
    if from_thread:
        t = threading.Thread(target=lambda: box.setdefault("pid", _in_forked_child((r, w))))
        t.start()
        t.join(WAIT)
        pid = box["pid"]
    else:
        pid = _in_forked_child((r, w))
    os.close(w)
    chunks = []
    import select

    while True:
        ready, _, _ = select.select([r], [], [], WAIT)
        if not ready:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return {"error": f"child hung for {WAIT} s"}
        chunk = os.read(r, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    report = json.loads(b"".join(chunks) or b"{}")
    report["status"] = status
    return report


def pool() -> list[dict]:
    with mp.get_context("fork").Pool(2) as workers:
        return workers.map_async(_child_case, list(CASES) * 2).get(WAIT)


def two_threads() -> dict:
    """Two threads, each stepping its own optimizer at a parallel size, at the same time."""
    results = {}
    barrier = threading.Barrier(2)

    def work(name):
        barrier.wait()
        results[name] = [CASES[name]() for _ in range(5)]

    threads = [threading.Thread(target=work, args=(name,)) for name in ("adam", "adamw_noise")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    return results


def main() -> None:
    report = {"requested": os.environ.get("NUMBA_THREADING_LAYER", "default")}
    report["parent"] = {name: fn() for name, fn in CASES.items()}
    report["layer"] = numba.threading_layer()
    report["tbb_preloaded"] = _threads.state.tbb_preloaded
    report["fork_safe"] = _threads.fork_safe()
    for part, fn in [("pool", pool), ("fork", lambda: forked(False)), ("thread_fork", lambda: forked(True)),
                     ("two_threads", two_threads)]:
        try:
            report[part] = fn()
        except BaseException as exc:  # noqa: BLE001 - every part reports, whatever the others did
            report[part] = {"error": repr(exc)}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
