"""fo.save / fo.load: a round trip continues a run exactly; saving is atomic (a saving process
killed with SIGKILL leaves the previous checkpoint loadable); truncated, damaged or foreign
files are clear errors that leave the optimizer as it was."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

import fastopt as fo
from fastopt.checkpoint import CheckpointError


def model(seed=0):
    rng = np.random.default_rng(seed)
    flat = fo.FlatParams({"w1": (8, 5), "b1": 5, "w2": (5, 2), "b2": 2})
    for n in flat:
        flat[n][...] = rng.standard_normal(flat[n].shape)
    return flat


def make_opt(flat):
    return fo.Adam([{"params": flat.select("w*"), "weight_decay": 0.1},
                    {"params": flat.select("b*"), "lr": 0.05, "amsgrad": True}], lr=0.01)


def grads(flat, rng):
    g = flat.zeros_like()
    g.buffer[...] = rng.standard_normal(g.buffer.size)
    return g


def snapshot(opt, flat):
    return flat.buffer.copy(), opt.state_dict(), [dict(g, params=None) for g in opt.param_groups]


def assert_unchanged(opt, flat, snap):
    buffer, sd, groups = snap
    np.testing.assert_array_equal(flat.buffer, buffer)
    now = opt.state_dict()
    assert now["step_count"] == sd["step_count"]
    for name, entry in sd["state"].items():
        for k, v in entry.items():
            np.testing.assert_array_equal(now["state"][name][k], v)
    assert [dict(g, params=None) for g in opt.param_groups] == groups


def test_round_trip_continues_identically(tmp_path):
    rng = np.random.default_rng(1)
    flat = model()
    opt = make_opt(flat)
    for _ in range(3):
        opt.step(grads(flat, rng))
    path = tmp_path / "ckpt.npz"
    fo.save(opt, path)
    later = [grads(flat, rng) for _ in range(3)]
    for g in later:
        opt.step(g)

    flat2 = model(seed=99)  # other values: load must restore the parameters too
    opt2 = fo.Adam([{"params": flat2.select("w*")}, {"params": flat2.select("b*"), "amsgrad": True}], lr=0.5)
    fo.load(opt2, path)
    assert opt2.step_count == 3
    assert opt2.param_groups[0]["lr"] == 0.01 and opt2.param_groups[0]["weight_decay"] == 0.1
    assert opt2.param_groups[1]["lr"] == 0.05 and opt2.param_groups[1]["betas"] == (0.9, 0.999)
    for g in later:
        opt2.step(g)
    np.testing.assert_array_equal(flat2.buffer, flat.buffer)
    for name, entry in opt.state.items():
        for k, v in entry.items():
            np.testing.assert_array_equal(opt2.state[name][k], v)


def test_round_trip_of_a_list_optimizer_with_host_state(tmp_path):
    rng = np.random.default_rng(2)
    params = [rng.standard_normal(s).astype(np.float64) for s in [(4, 3), (3,), ()]]
    opt = fo.NAdam(params, lr=0.01, momentum_decay=0.01)
    for _ in range(2):
        opt.step([rng.standard_normal(p.shape) for p in params])
    fo.save(opt, str(tmp_path / "list.ckpt"))  # used as given: no .npz appended
    assert os.listdir(tmp_path) == ["list.ckpt"]
    other = [np.zeros_like(p) for p in params]
    opt2 = fo.NAdam(other, lr=0.01, momentum_decay=0.01)
    fo.load(opt2, tmp_path / "list.ckpt")
    for a, b in zip(params, other):
        np.testing.assert_array_equal(a, b)
    assert opt2.state[0]["mu_product"] == opt.state[0]["mu_product"]  # float64 host scalar, exact
    g = [rng.standard_normal(p.shape) for p in params]
    opt.step(g)
    opt2.step([x.copy() for x in g])
    for a, b in zip(params, other):
        np.testing.assert_array_equal(a, b)


def test_a_schedule_is_not_saved_and_survives_load(tmp_path):
    schedule = lambda step: 0.1 / (1 + step)
    flat = model()
    opt = fo.SGD(flat, lr=schedule, momentum=0.9)
    opt.step(flat.zeros_like())
    fo.save(opt, tmp_path / "c.npz")
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        meta = json.loads(z["meta"].tobytes())
    assert meta["param_groups"][0]["lr"] is None
    fo.load(opt, tmp_path / "c.npz")
    assert opt.param_groups[0]["lr"] is schedule


def test_the_file_holds_no_pickle(tmp_path):
    flat = model()
    fo.save(make_opt(flat), tmp_path / "c.npz")
    with zipfile.ZipFile(tmp_path / "c.npz") as z:
        for name in z.namelist():
            with z.open(name) as f:
                assert np.lib.format.read_magic(f) == (1, 0)
                _, _, dtype = np.lib.format.read_array_header_1_0(f)
                assert dtype != np.dtype(object)
    with np.load(tmp_path / "c.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)


def bad_files(tmp_path, good: bytes):
    """(name, bytes) of files that are not loadable checkpoints."""
    npy = tmp_path / "one.npy"
    np.save(npy, np.zeros(3))
    plain_npz = tmp_path / "plain.npz"
    np.savez(plain_npz, a=np.zeros(3))
    meta_v2 = tmp_path / "v2.npz"
    np.savez(meta_v2, meta=np.frombuffer(json.dumps({"fastopt_checkpoint": 2}).encode(), np.uint8))
    good_path = tmp_path / "good-copy.npz"
    good_path.write_bytes(good)
    with zipfile.ZipFile(good_path) as z:
        second = z.infolist()[1].header_offset
    flipped = bytearray(good)
    flipped[second - 5] ^= 0xFF  # in the last float of the first array: the zip CRC catches it
    return [
        ("empty", b""),
        ("text", b"hello, I am not a checkpoint\n" * 10),
        ("npy", npy.read_bytes()),
        ("npz without meta", plain_npz.read_bytes()),
        ("future version", meta_v2.read_bytes()),
        ("flipped byte", bytes(flipped)),
        *[(f"truncated to {k}", good[:k]) for k in (30, len(good) // 2, len(good) - 30, len(good) - 1)],
    ]


def test_truncated_damaged_or_foreign_files_are_clear_errors_and_change_nothing(tmp_path):
    rng = np.random.default_rng(3)
    flat = model()
    opt = make_opt(flat)
    opt.step(grads(flat, rng))
    path = tmp_path / "good.npz"
    fo.save(opt, path)
    good = path.read_bytes()
    opt.step(grads(flat, rng))
    snap = snapshot(opt, flat)
    for what, data in bad_files(tmp_path, good):
        bad = tmp_path / "bad.npz"
        bad.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            fo.load(opt, bad)
        assert "bad.npz" in str(info.value), what
        assert_unchanged(opt, flat, snap)
    with pytest.raises(FileNotFoundError):
        fo.load(opt, tmp_path / "missing.npz")
    fo.load(opt, path)  # the good one still loads
    assert opt.step_count == 1


def test_checkpoints_of_another_model_or_optimizer_are_refused(tmp_path):
    flat = model()
    opt = make_opt(flat)
    snap = snapshot(opt, flat)
    def two_groups(f, **bias_options):
        return fo.Adam([{"params": f.select("w*")}, {"params": f.select("b*"), **bias_options}])

    others = {
        "sgd": fo.SGD(model(), lr=0.1),
        "one group": fo.Adam(model(), lr=0.1),
        "other shapes": two_groups(fo.FlatParams({"w1": (5, 8), "b1": 5, "w2": (5, 2), "b2": 2})),
        "float64": two_groups(fo.FlatParams({"w1": (8, 5), "b1": 5, "w2": (5, 2), "b2": 2}, np.float64)),
        "a list": fo.Adam([{"params": [np.zeros((8, 5), np.float32), np.zeros((5, 2), np.float32)]},
                           {"params": [np.zeros(5, np.float32), np.zeros(2, np.float32)]}]),
    }
    for what, other in others.items():
        path = tmp_path / f"{what}.npz"
        fo.save(other, path)
        with pytest.raises((ValueError, TypeError)):
            fo.load(opt, path)
        assert_unchanged(opt, flat, snap)
    # hyper-parameters come from the checkpoint (as with torch's load_state_dict)
    fo.save(two_groups(model(), amsgrad=False), tmp_path / "options.npz")
    fo.load(opt, tmp_path / "options.npz")
    assert opt.param_groups[1]["amsgrad"] is False and "max_exp_avg_sq" not in opt.state["b1"]


# -- atomicity: kill a process while it saves ------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    import fastopt as fo

    path, mode = sys.argv[1], sys.argv[2]
    flat = fo.FlatParams({"a": 1_500_000, "b": (1000, 1000), "c": 7})
    opt = fo.Adam([{"params": flat.select("a", "c")}, {"params": flat.select("b"), "lr": 0.5}], lr=0.1)

    def version(k):  # every value of version k is k: parameters, state, steps
        flat.buffer[...] = k
        sd = opt.state_dict()
        sd["step_count"] = k
        for entry in sd["state"].values():
            entry["step"] = k
            for name in ("exp_avg", "exp_avg_sq"):
                entry[name][...] = k
        opt.load_state_dict(sd)

    version(1)
    fo.save(opt, path)
    print("SAVED 1", flush=True)
    if mode == "midway":  # pause inside the second save, after its first arrays are written
        try:
            import numpy.lib._npyio_impl as npyio  # NumPy 2
        except ImportError:
            import numpy.lib.npyio as npyio
        real = npyio.format.write_array
        written = []
        def slow(fid, array, **kw):
            real(fid, array, **kw)
            written.append(1)
            if len(written) == 3:
                print("MIDWAY", flush=True)
                time.sleep(600)
        npyio.format.write_array = slow
    k = 2
    while True:
        version(k)
        fo.save(opt, path)
        print(f"SAVED {k}", flush=True)
        k += 1
    """
)


def checked_version(path) -> int:
    """Load the checkpoint into a fresh optimizer; it must be one whole version."""
    flat = fo.FlatParams({"a": 1_500_000, "b": (1000, 1000), "c": 7})
    opt = fo.Adam([{"params": flat.select("a", "c")}, {"params": flat.select("b")}], lr=0.1)
    fo.load(opt, path)
    k = opt.step_count
    assert k >= 1
    for name in flat:
        assert np.all(flat[name] == k), name
    for entry in opt.state.values():
        assert entry["step"] == k
        assert np.all(entry["exp_avg"] == k) and np.all(entry["exp_avg_sq"] == k)
    assert opt.param_groups[1]["lr"] == 0.5
    return k


def start_child(tmp_path, mode):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    path = tmp_path / "ckpt.npz"
    proc = subprocess.Popen([sys.executable, str(script), str(path), mode], stdout=subprocess.PIPE, text=True)
    return proc, path


def read_until(proc, prefix, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"child exited (rc={proc.wait()}) before printing {prefix!r}")
        if line.startswith(prefix):
            return line
    raise AssertionError(f"child did not print {prefix!r} in {timeout} s")


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def temp_files(tmp_path):
    return [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.npz.") and p.name.endswith(".tmp")]


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    proc, path = start_child(tmp_path, "midway")
    try:
        read_until(proc, "SAVED 1")
        read_until(proc, "MIDWAY")
    finally:
        kill(proc)
    partial = temp_files(tmp_path)
    assert len(partial) == 1 and partial[0].stat().st_size > 1_000_000  # killed while writing it
    with pytest.raises(CheckpointError):  # the partial file is not a checkpoint
        checked_version(partial[0])
    assert checked_version(path) == 1


def test_saves_killed_at_random_times_always_leave_a_whole_checkpoint(tmp_path):
    rnd = random.Random(4)
    killed_while_writing = 0
    for attempt in range(6):
        proc, path = start_child(tmp_path, "loop")
        try:
            last = int(read_until(proc, "SAVED").split()[1])
            time.sleep(rnd.uniform(0.0, 0.6))
        finally:
            kill(proc)
        killed_while_writing += bool(temp_files(tmp_path))
        for p in temp_files(tmp_path):
            p.unlink()
        assert checked_version(path) >= last
        if attempt >= 2 and killed_while_writing:
            break
    assert killed_while_writing, "no kill landed inside a save; the test exercised nothing"
