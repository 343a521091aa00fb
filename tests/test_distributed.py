"""ShardedOptimizer (ZeRO-1 over MPI) against one process stepping on the averaged gradients.

The ranks run as ``mpiexec -n W python tests/mpi_worker.py`` subprocesses (the venv's own
mpiexec, beside ``sys.executable``), bound to shared memory and loopback (``MPI_ENV``); this
process never imports ``mpi4py.MPI``. The worker defines the model, the groups, the options and
each rank's gradients; here the same are replayed in one process on
:math:`\\bar g = \\frac1W \\sum_r g^{(r)}`, summed in rank order. Two ranks must match bit for
bit (one rounding of :math:`g^{(0)} + g^{(1)}`, then an exact halving); three within rounding.
With ``clip_grad_norm`` the global norm is summed in another order, so its last bit may differ.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import mpi_worker as W  # noqa: E402

MPIEXEC = Path(sys.executable).parent / "mpiexec"
#: Keep MPI on this machine: MPICH's UCX netmod on shared memory and loopback only, hydra
#: forking its ranks locally and talking to them over the loopback interface.
MPI_ENV = {"MPIR_CVAR_CH4_NETMOD": "ucx", "UCX_TLS": "self,sm", "UCX_NET_DEVICES": "lo",
           "HYDRA_LAUNCHER": "fork", "HYDRA_IFACE": "lo", "FI_PROVIDER": "shm"}



def missing_mpi() -> str | None:
    """Why the MPI tests cannot run here, or None."""
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'fastopt[mpi]')"
    if not MPIEXEC.exists():
        return f"no mpiexec beside {sys.executable} (pip install 'fastopt[mpi]' installs MPICH's)"
    return None


def mpirun(n: int, *args: str, script: Path = HERE / "mpi_worker.py", timeout: float = 120) -> None:
    reason = missing_mpi()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, **MPI_ENV}
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, str(script), *args]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def single_run(name: str, world: int, steps: int = W.STEPS):
    """The scenario in one process on the ranks' averaged gradients."""
    dtype = W.SCENARIOS[name][3]
    flat = W.make_flat(dtype)
    opt = W.build(name, flat)
    for step in range(steps):
        grads = [W.local_grad(flat, r, step, name == "clip_skip" and step in W.NAN_STEPS and r == min(1, world - 1))
                 for r in range(world)]
        total = grads[0].buffer.copy()
        for g in grads[1:]:
            total += g.buffer
        avg = flat.zeros_like()
        np.divide(total, dtype(world), out=avg.buffer)
        opt.step(avg)
    return flat, opt


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp("mpi")
    flat, opt = single_run("Adam", 2)  # a plain optimizer's state, for the n=3 run to load
    with open(base / "single-state.pkl", "wb") as f:
        pickle.dump({"params": flat.buffer.copy(), "state": opt.state_dict()}, f)
    return base


@pytest.fixture(scope="module")
def two(base):
    mpirun(2, str(base))
    with open(base / "result-2.pkl", "rb") as f:
        return pickle.load(f)


@pytest.fixture(scope="module")
def three(base, two):  # after `two`: loads its checkpoint
    mpirun(3, str(base), str(base / "ckpts"))
    with open(base / "result-3.pkl", "rb") as f:
        return pickle.load(f)


def compare(result, name, world, exact):
    flat, opt = single_run(name, world)
    run = result["runs"][name]
    check = ((lambda a, b, what: np.testing.assert_array_equal(a, b, err_msg=what)) if exact else
             (lambda a, b, what: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=what)))
    check(run["params"], flat.buffer, f"{name}: parameters")
    want = opt.state_dict()
    got = run["state"]
    assert got["param_groups"] == want["param_groups"]
    assert got["step_count"] == want["step_count"] == run["step_count"]
    assert list(got["state"]) == list(want["state"])
    for tensor, entry in want["state"].items():
        assert set(got["state"][tensor]) == set(entry)
        for k, v in entry.items():
            if isinstance(v, np.ndarray):
                check(got["state"][tensor][k], v, f"{name}: state {k} of {tensor}")
            else:
                assert got["state"][tensor][k] == pytest.approx(v, rel=1e-12), f"{name}: {k} of {tensor}"
    # the tensor in no group is never touched
    np.testing.assert_array_equal(run["params"][flat.layout.span("frozen")], W.make_flat(flat.dtype)["frozen"].ravel())
    return opt


@pytest.mark.parametrize("name", [n for n in W.SCENARIOS if n != "clip_skip"])
def test_two_ranks_match_one_process_bit_for_bit(two, name):
    compare(two, name, 2, exact=True)


@pytest.mark.parametrize("name", [n for n in W.SCENARIOS if n != "clip_skip"])
def test_three_ranks_match_one_process(three, name):
    compare(three, name, 3, exact=False)


@pytest.mark.parametrize("world", [2, 3])
def test_clip_and_skip_use_the_global_norm_and_skip_on_every_rank(two, three, world):
    result = {2: two, 3: three}[world]
    opt = compare(result, "clip_skip", world, exact=False)
    run = result["runs"]["clip_skip"]
    assert run["skipped"] == opt.skipped_steps == len(W.NAN_STEPS)
    assert run["step_count"] == W.STEPS - len(W.NAN_STEPS)
    assert run["norm"] == pytest.approx(opt.last_grad_norm, rel=1e-6)
    assert opt.last_grad_norm > W.SCENARIOS["clip_skip"][1]["clip_grad_norm"]  # clipping was active


@pytest.mark.parametrize("world", [2, 3])
def test_state_memory_is_split_across_ranks(two, three, world):
    result = {2: two, 3: three}[world]
    for name in ("Adam", "SGD", "RMSprop"):
        _, opt = single_run(name, 1, steps=1)
        total = sum(b.nbytes for b in opt._flat.buffers.values())
        per_rank = result["state_nbytes"][name]
        assert len(per_rank) == world
        assert sum(per_rank) == total, name
        assert max(per_rank) <= -(-total // world) + 64 * len(opt._flat.buffers), name


def test_checkpoints_reshard_between_world_sizes(three):
    flat, _ = single_run("Adam", 2, steps=W.STEPS)  # ckpt-2: 3 steps on 2 ranks' gradients
    # resumed on 3 ranks: the 4th step averages 3 ranks' gradients
    ref_flat, ref = single_run("Adam", 2, steps=W.STEPS)
    grads = [W.local_grad(ref_flat, r, W.STEPS) for r in range(3)]
    avg = ref_flat.zeros_like()
    np.divide(grads[0].buffer + grads[1].buffer + grads[2].buffer, np.float32(3), out=avg.buffer)
    ref.step(avg)
    resumed = three["resumed"]["ckpt-2"]
    np.testing.assert_allclose(resumed, ref_flat.buffer, rtol=2e-5, atol=1e-6)
    assert not np.array_equal(resumed, flat.buffer)  # the resumed run did step
    # the consolidated state of one process, loaded into 3 ranks, gives the same
    np.testing.assert_allclose(three["from_single"], ref_flat.buffer, rtol=2e-5, atol=1e-6)
    # ckpt-3 (3 steps on 3 ranks), saved and loaded by 3 ranks
    ref3_flat, _ = single_run("Adam", 3, steps=W.STEPS + 1)
    np.testing.assert_allclose(three["resumed"]["ckpt-3"], ref3_flat.buffer, rtol=2e-5, atol=1e-6)


def test_bad_state_dict_raises_on_every_rank_and_changes_nothing(two):
    assert two["bad_load"] != "accepted"
    assert "param groups" in two["bad_load"]
    assert two["bad_load_all_ranks"]
    assert two["bad_load_unchanged"]


@pytest.mark.parametrize("world", [2, 3])
def test_missing_or_foreign_sharded_checkpoint_raises_on_every_rank(two, three, world):
    result = {2: two, 3: three}[world]
    assert len(result["missing_load"]) == world
    assert all(m.startswith("FileNotFoundError") for m in result["missing_load"])
    assert len(result["foreign_load"]) == world
    assert all(m.startswith("CheckpointError") and "another model" in m for m in result["foreign_load"])
    assert result["bad_load_unchanged"]


@pytest.mark.parametrize("world", [2, 3])
def test_damaged_sharded_checkpoints_raise_checkpoint_error_on_every_rank(two, three, world):
    """Files damaged as fo.load's tests damage one (extra member, a flipped byte, truncated,
    a huge declared shape, tampered metadata, a file of a world of 10**12): CheckpointError on
    every rank, and no rank's parameters or state changed."""
    result = {2: two, 3: three}[world]
    assert set(result["damaged"]) == set(W.DAMAGES)
    for label, outcomes in result["damaged"].items():
        assert len(outcomes) == world and all(o.startswith("CheckpointError") for o in outcomes), (label, outcomes)
    assert result["damaged_unchanged"] == [True] * world


@pytest.mark.parametrize("world", [2, 3])
def test_a_save_that_fails_on_one_rank_raises_everywhere_and_keeps_the_previous_checkpoint(two, three, world):
    result = {2: two, 3: three}[world]
    # every rank raises the failing rank's OSError, one message naming it (the last rank's disk is full)
    assert all(o.startswith("OSError") and f"failed on rank {world - 1} of {world}: disk full" in o
               for o in result["failed_save"]), result["failed_save"]
    assert result["failed_save_kept"]


def test_ranks_that_own_no_tensor_take_part(three):
    flat = W.fo.FlatParams({"a": 5}, np.float32)
    flat["a"][...] = np.arange(5)
    opt = W.fo.Adam(flat, lr=0.1)
    for step in range(W.STEPS):
        grads = [W.local_grad(flat, r, step).buffer for r in range(3)]
        avg = flat.zeros_like()
        np.divide(grads[0] + grads[1] + grads[2], np.float32(3), out=avg.buffer)
        opt.step(avg)
    np.testing.assert_allclose(three["tiny"]["params"], flat.buffer, rtol=2e-6)
    want = opt.state_dict()["state"]["a"]
    for k in ("exp_avg", "exp_avg_sq"):
        np.testing.assert_allclose(three["tiny"]["state"]["state"]["a"][k], want[k], rtol=2e-6, atol=1e-12)


@pytest.mark.parametrize("world", [2, 3])
def test_bad_arguments_raise_clear_errors(two, three, world):
    errors = {2: two, 3: three}[world]["errors"]
    assert errors == {"grad_noise": "NotImplementedError", "class": "TypeError", "align": "ValueError",
                      "lr": "ValueError", "layout": "ValueError", "aliased": "ValueError"}


def test_distributed_mlp_example_trains_and_keeps_the_ranks_in_step(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "result.json"
    mpirun(2, "--epochs", "2", "--subset", "256", "--json", str(out),
           script=HERE.parent / "examples" / "mlp_digits_distributed.py")
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["steps"] == 2 * 4
    assert result["loss"][-1] < result["loss"][0] / 2
    assert result["checksums"][0] == result["checksums"][1]  # every rank holds the same parameters
    assert result["test_accuracy"] > 0.5


@pytest.mark.parametrize("world", [2, 3])
def test_parameters_start_as_rank_0s_and_a_mismatched_model_raises_everywhere(two, three, world):
    result = {2: two, 3: three}[world]
    assert result["broadcast"] == [0.0] * world
    assert len(result["mismatch"]) == world
    assert all(m is not None and f"ranks [{world - 1}]" in m for m in result["mismatch"])


def test_import_fastopt_does_not_import_mpi4py():
    code = "import sys, fastopt, fastopt.distributed; assert 'mpi4py' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_shard_bounds_cover_the_buffer_in_aligned_pieces():
    from fastopt.distributed import shard_bounds

    for size in (0, 1, 16, 17, 100, 1000):
        for world in (1, 2, 3, 5):
            b = shard_bounds(size, world, 16)
            assert b[0][0] == 0 and b[-1][1] == size
            assert all(lo <= hi for lo, hi in b) and all(b[i][1] == b[i + 1][0] for i in range(world - 1))
            assert all(lo % 16 == 0 or lo == size for lo, _ in b)
            per = 16 * -(-size // (16 * world))
            assert all(hi - lo == per for lo, hi in b if hi < size)



def test_the_worker_model_has_tensors_cut_by_shard_boundaries():
    """Guards the coverage above: a group's hyper-parameters on both sides of a cut, and
    re-sharding 2 -> 3 that copies from the middle of a saved piece."""
    from fastopt.distributed import shard_bounds

    layout = W.make_flat().layout
    for world, cut in ((2, {"w2"}), (3, {"w1", "w2"})):
        bounds = shard_bounds(layout.size, world, layout.align // layout.dtype.itemsize)
        names = {n for n, o, s in zip(layout.names, layout.offsets, layout.sizes)
                 for lo, _ in bounds[1:] if o < lo < o + s}
        assert names == cut, world


def test_shard_layouts_tile_every_tensor_once_with_aligned_pieces():
    from fastopt.distributed import _shard_layout, shard_bounds

    layout = W.make_flat().layout
    step = layout.align // layout.dtype.itemsize
    for world in (1, 2, 3, 4, 7):
        covered = {name: np.zeros(size, int) for name, size in zip(layout.names, layout.sizes)}
        for lo, hi in shard_bounds(layout.size, world, step):
            shard, starts = _shard_layout(layout, lo, hi)
            assert shard.size == hi - lo
            for name, offset, size in zip(shard.names, shard.offsets, shard.sizes):
                assert offset % step == 0
                tensor = layout.index(name)
                assert lo + offset == layout.offsets[tensor] + starts[name]  # the same buffer position
                covered[name][starts[name] : starts[name] + size] += 1
        assert all((c == 1).all() for c in covered.values()), world


# -- one rank's failure reaches every rank ----------------------------------------------------
def launch(n: int, *args: str, timeout: float, script: Path = HERE / "mpi_worker.py") -> tuple[int, str, float]:
    """Run ``mpiexec -n n python script args`` in its own process group; on timeout kill the
    whole group (mpiexec, its proxies and the ranks). Returns (returncode, output, seconds);
    returncode None if it ran past ``timeout``."""
    import signal
    import time

    reason = missing_mpi()
    if reason:
        pytest.skip(reason)
    cmd = [str(MPIEXEC), "-n", str(n), sys.executable, str(script), *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **MPI_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc = None
    return rc, out, time.perf_counter() - t0


#: fault case -> the exception type every rank must raise (None: every rank goes on)
FAULTS = {
    "grad_size": "ValueError", "grad_dtype": "TypeError", "grad_aliased": "ValueError",
    "nan_on_one_rank": None, "skip_nonfinite_on_one_rank": "ValueError",
    "skip_nonfinite_toggled_on_one_rank": "ValueError", "clip_on_one_rank": "ValueError",
    "invalid_lr_at_construction": "ValueError", "invalid_class_at_construction": "TypeError",
    "different_lr_at_construction": "ValueError", "different_default_spelled_out": None,
    "invalid_group_edit": "ValueError", "wrong_type_group_edit": "TypeError", "different_group_edit": "ValueError",
    "schedule_differs": "ValueError", "schedule_invalid": "ValueError", "schedule_raises": "ZeroDivisionError",
    "load_bad_dict": "ValueError", "load_not_a_dict": "TypeError", "load_other_step_count": "ValueError",
    "gather_other_root": "ValueError", "save_fails_on_one_rank": "OSError",
    "read_only_at_construction": "ValueError", "read_only_before_step": "ValueError",
    "group_removed": "ValueError", "group_params_replaced": "ValueError",
    "save_other_directory": "ValueError", "load_other_checkpoint": "ValueError",
    "two_ranks_fail": "TypeError",  # rank 0's type (the lowest failing rank), the last rank's is ValueError
}
#: the ranks that fail, where not only the last one
FAULT_RANKS = {"two_ranks_fail": lambda world: [0, world - 1]}
#: what the message must name besides the faulty rank (an option that differs)
FAULT_WORDS = {"skip_nonfinite_on_one_rank": "skip_nonfinite", "skip_nonfinite_toggled_on_one_rank": "skip_nonfinite",
               "clip_on_one_rank": "clip_grad_norm", "different_lr_at_construction": "lr",
               "different_group_edit": "param group 1 weight_decay", "schedule_differs": "param group 0 lr",
               "load_other_step_count": "step_count", "gather_other_root": "root", "grad_size": "shape",
               "read_only_at_construction": "read-only", "read_only_before_step": "read-only",
               "group_removed": "param groups", "group_params_replaced": "replaced",
               "save_other_directory": "directory", "load_other_checkpoint": "parameters"}


#: jobs run_faults starts at most (each case that hangs costs one, and CASE_TIMEOUT seconds)
MAX_HUNG = 4


def run_faults(world: int, base: Path) -> dict:
    """Every fault case under ``mpiexec -n world``: a case that hangs (the worker's watchdog
    ends the job after CASE_TIMEOUT seconds) is recorded as hung with the job's output, and
    the cases after it run in a new job, up to MAX_HUNG jobs; cases not reached then fail."""
    hung: dict[str, str] = {}
    path = base / f"faults-{world}.pkl"
    for _ in range(MAX_HUNG):  # a broken mechanism must not eat CI's budget: stop after a few
        done = set()
        if path.exists():
            with open(path, "rb") as f:
                done = set(pickle.load(f))
        todo = [n for n in FAULTS if n not in done and n not in hung]
        if not todo:
            break
        rc, out, _ = launch(world, "faults", str(base), *done, *hung, timeout=60 + W.CASE_TIMEOUT * len(todo))
        if rc == 0:
            break
        now = set()
        if path.exists():
            with open(path, "rb") as f:
                now = set(pickle.load(f))
        stuck = next((n for n in todo if n not in now), None)
        if stuck is None:  # every case ran, then the job failed
            hung["(after the last case)"] = out[-3000:]
            break
        hung[stuck] = out[-3000:]  # hung (the watchdog) or crashed
    results = {}
    if path.exists():
        with open(path, "rb") as f:
            results = pickle.load(f)
    why = f"not run: {len(hung)} earlier cases hung or crashed ({', '.join(hung)})"
    for name in FAULTS:
        if name not in results and name not in hung:
            hung[name] = why
    return {"results": results, "hung": hung}


@pytest.fixture(scope="module")
def faults2(tmp_path_factory):
    return run_faults(2, tmp_path_factory.mktemp("faults2"))


@pytest.fixture(scope="module")
def faults3(tmp_path_factory):
    return run_faults(3, tmp_path_factory.mktemp("faults3"))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("case", list(FAULTS))
def test_a_fault_on_one_rank_raises_on_every_rank_and_changes_nothing(faults2, faults3, world, case):
    """The last rank misbehaves (a bad gradient, option, edit, schedule, state dict, root or
    file); every rank must raise the same exception type with the same message naming that
    rank, nothing may change, and afterwards the ranks must still step together."""
    run = {2: faults2, 3: faults3}[world]
    assert case not in run["hung"], f"{case} hung or crashed on {world} ranks:\n{run['hung'][case]}"
    seen = run["results"][case]
    assert len(seen) == world
    errors = [s["error"] for s in seen]
    want = FAULTS[case]
    if want is None:
        assert errors == [None] * world
    else:
        assert all(e is not None for e in errors), errors
        assert {e[0] for e in errors} == {want}, errors
        assert len({e[1] for e in errors}) == 1, errors  # one message on every rank
        bad = FAULT_RANKS.get(case, lambda world: [world - 1])(world)
        named = f"rank {bad[0]}" if len(bad) == 1 else f"ranks {bad}"
        assert f"{named} of {world}" in errors[0][1] or f"ranks {bad} differ" in errors[0][1], errors[0][1]
        assert all(e[2] == bad for e in errors), errors
        assert FAULT_WORDS.get(case, "") in errors[0][1], errors[0][1]
    for s in seen:
        if "unchanged" in s:
            assert s["unchanged"], f"{case}: something changed on a rank"
        assert s["then_stepped"]
    assert len({s["checksum"] for s in seen}) == 1, f"{case}: the ranks' parameters differ afterwards"


def test_a_failure_after_the_ranks_agreed_aborts_the_job():
    rc, out, seconds = launch(2, "after_agreement_failure", timeout=120)
    assert rc is not None, f"the job hung:\n{out[-3000:]}"
    assert rc != 0 and "not aborted" not in out, out[-3000:]
    assert "simulated: the update failed" in out and "comm.Abort" in out, out[-3000:]


@pytest.mark.parametrize("world", [2, 3])
def test_abort_on_exception_ends_the_job_when_one_rank_raises(world):
    rc, out, seconds = launch(world, "uncaught", "hook", timeout=120)
    assert rc is not None, f"the job hung:\n{out[-3000:]}"
    assert rc != 0 and "not aborted" not in out, out[-3000:]
    assert "RuntimeError: a user error outside fastopt" in out, out[-3000:]  # the traceback is printed


def test_fault_jobs_end_cleanly(faults2, faults3):
    for run in (faults2, faults3):
        assert "(after the last case)" not in run["hung"], run["hung"].get("(after the last case)")
