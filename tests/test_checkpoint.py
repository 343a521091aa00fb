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


# -- untrusted input: every malformed file is a CheckpointError that changes nothing ---------

def tiny(kind="adam"):
    """Adam: two groups, two dtypes, amsgrad in one (8 members); SGD: one parameter with
    momentum (3 members, 230 bytes of directory)."""
    w = np.array([0.5, -1.5], np.float32)
    if kind == "sgd":
        return fo.SGD([w], lr=0.1, momentum=0.9), [w]
    b = np.array([2.0, 0.25, -3.0])
    opt = fo.Adam([{"params": [w]}, {"params": [b], "amsgrad": True, "lr": 0.05}], lr=0.01)
    return opt, [w, b]


def tiny_state(opt, params):
    """Everything a load can change, copied."""
    sd = opt.state_dict()
    return ([p.copy() for p in params], sd["step_count"],
            [{k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in e.items()} for e in sd["state"].values()],
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def assert_same(a, b):
    params_a, steps_a, state_a, groups_a = a
    params_b, steps_b, state_b, groups_b = b
    assert steps_a == steps_b and groups_a == groups_b
    for x, y in zip(params_a, params_b):
        np.testing.assert_array_equal(x, y, strict=True)
    assert [sorted(e) for e in state_a] == [sorted(e) for e in state_b]
    for ea, eb in zip(state_a, state_b):
        for k in ea:
            if isinstance(ea[k], np.ndarray):
                np.testing.assert_array_equal(ea[k], eb[k], strict=True)
            else:
                assert ea[k] == eb[k]


@pytest.fixture
def tiny_case(tmp_path):
    return make_case(tmp_path, "adam")


def make_case(tmp_path, kind):
    """(saved checkpoint bytes, the state it holds, an optimizer in another state, its
    parameters, a checkpoint of that other state)."""
    rng = np.random.default_rng(5)
    opt, params = tiny(kind)
    for _ in range(2):
        opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in params])
    fo.save(opt, tmp_path / "good.npz")
    saved = tiny_state(opt, params)
    opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in params])
    fo.save(opt, tmp_path / "later.npz")
    return (tmp_path / "good.npz").read_bytes(), saved, opt, params, tmp_path / "later.npz"


def try_load(opt, params, path, saved, later_path, counts):
    """Load ``path``: it either restores exactly ``saved`` or raises CheckpointError and changes
    nothing. ``counts`` tallies the outcomes."""
    before = tiny_state(opt, params)
    try:
        fo.load(opt, path)
    except CheckpointError:
        counts["refused"] += 1
        assert_same(tiny_state(opt, params), before)
        return
    counts["loaded"] += 1
    assert_same(tiny_state(opt, params), saved)
    fo.load(opt, later_path)  # back to the other state, so that the next case can see a change


def test_every_bit_flip_in_the_directory_and_metadata_is_caught_or_harmless(tmp_path):
    """Each flip either loads exactly the saved values (a date, a version, an attribute: fields
    no CRC covers and that change nothing) or raises CheckpointError, changing nothing."""
    good, saved, opt, params, later = make_case(tmp_path, "sgd")
    with zipfile.ZipFile(tmp_path / "good.npz") as z:
        infos = {i.filename: i for i in z.infolist()}
        directory = z.start_dir
    meta_start = infos["meta.npy"].header_offset
    assert meta_start > max(i.header_offset for n, i in infos.items() if n != "meta.npy")  # written last
    bits = list(range(8 * meta_start, 8 * len(good)))  # the metadata member, the directory, the end record
    bits += random.Random(6).sample(range(8 * meta_start), 400)  # the arrays' members
    counts = {"loaded": 0, "refused": 0}
    bad = tmp_path / "bad.npz"
    for bit in bits:
        data = bytearray(good)
        data[bit // 8] ^= 1 << (bit % 8)
        bad.write_bytes(data)
        try_load(opt, params, bad, saved, later, counts)
    assert counts["refused"] > len(bits) / 2 and counts["loaded"] > 0, counts  # both outcomes were seen
    assert 8 * (len(good) - directory) > 1500  # the directory was a real part of the sample


def test_every_truncation_and_extension_is_refused(tiny_case, tmp_path):
    good, saved, opt, params, later = tiny_case
    counts = {"loaded": 0, "refused": 0}
    bad = tmp_path / "bad.npz"
    for k in range(len(good)):
        bad.write_bytes(good[:k])
        try_load(opt, params, bad, saved, later, counts)
    assert counts == {"loaded": 0, "refused": len(good)}
    for junk in (b"\0", b"PK\x05\x06" + b"\0" * 18, good[-100:]):  # appended bytes: an end record that lies
        bad.write_bytes(good + junk)
        try_load(opt, params, bad, saved, later, counts)


def meta_of(data: bytes, tmp_path):
    p = tmp_path / "meta-source.npz"
    p.write_bytes(data)
    with np.load(p, allow_pickle=False) as z:
        return json.loads(z["meta"].tobytes()), {k: z[k] for k in z.files if k != "meta"}


def mutations(node, path=()):
    """(path, replacement) for every node of a JSON tree: other types, extremes, deletions."""
    others = [None, True, -1, 0, 2**64, 10**400, 1e308, float("nan"), "x", [], {}, [1, 2], {"a": 1}]
    if path:
        for other in others:
            yield path, other
        yield path, "<delete>"
    if isinstance(node, dict):
        yield path + ("<new key>",), 1
        for k, v in node.items():
            yield from mutations(v, path + (k,))
    elif isinstance(node, list):
        yield path + (len(node),), 0  # one more element
        for i, v in enumerate(node):
            yield from mutations(v, path + (i,))


def mutated(meta, path, value):
    meta = json.loads(json.dumps(meta))
    node = meta
    for k in path[:-1]:
        node = node[k]
    last = path[-1]
    if value == "<delete>":
        del node[last]
    elif last == "<new key>":
        node["extra_key"] = value
    elif isinstance(node, list) and last == len(node):
        node.append(value)
    else:
        node[last] = value
    return meta


def test_tampered_metadata_is_refused_or_loaded_never_another_error(tiny_case, tmp_path):
    """Metadata rewritten with a valid CRC: each field replaced by other types and extremes,
    deleted, or given a sibling. Every load succeeds (with the file's arrays) or raises
    CheckpointError, changing nothing."""
    good, saved, _, _, _ = tiny_case
    meta, arrays = meta_of(good, tmp_path)
    bad = tmp_path / "bad.npz"
    counts = {"loaded": 0, "refused": 0}
    cases = list(mutations(meta))
    assert len(cases) > 300
    for path, value in cases:
        text = json.dumps(mutated(meta, path, value)).encode()
        np.savez(bad, **arrays, meta=np.frombuffer(text, np.uint8))
        opt, params = tiny()
        before = tiny_state(opt, params)
        try:
            fo.load(opt, bad)
        except CheckpointError:
            counts["refused"] += 1
            assert_same(tiny_state(opt, params), before)
        else:
            counts["loaded"] += 1
            for p, s in zip(params, saved[0]):
                np.testing.assert_array_equal(p, s)
    assert counts["refused"] > 0.8 * len(cases) and counts["loaded"] > 0, counts


def npy(array=None, header=None, data=b"", version=(1, 0)) -> bytes:
    """A .npy member: ``array`` saved by NumPy, or a hand-written ``header`` then ``data``."""
    import io

    f = io.BytesIO()
    if array is not None:
        np.lib.format.write_array(f, array, version=version, allow_pickle=True)
    else:
        getattr(np.lib.format, f"write_array_header_{version[0]}_0")(f, header)
        f.write(data)
    return f.getvalue()


def write_zip(path, members: dict[str, bytes], compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as z:
        for name, data in members.items():
            z.writestr(name, data)


def members_of(data: bytes, tmp_path) -> dict[str, bytes]:
    p = tmp_path / "members-source.npz"
    p.write_bytes(data)
    with zipfile.ZipFile(p) as z:
        return {n: z.read(n) for n in z.namelist()}


class SideEffect:
    """Unpickling it creates a file: proof that a pickle was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_members_of_the_wrong_kind_are_refused_before_their_data_is_read(tiny_case, tmp_path):
    good, saved, opt, params, later = tiny_case
    members = members_of(good, tmp_path)
    w = saved[0][0]
    marker = tmp_path / "unpickled"
    huge = {"descr": "<f4", "fortran_order": False}
    bad_params = {
        "pickled object array": npy(np.array([SideEffect(str(marker)), 1.0], dtype=object)),
        "int32": npy(w.astype(np.int32)),
        "float64": npy(w.astype(np.float64)),
        "float16": npy(w.astype(np.float16)),
        "complex64": npy(w.astype(np.complex64)),
        "bool": npy(w > 0),
        "structured": npy(np.zeros(2, [("a", "<f4")])),
        "subarray": npy(np.zeros(1, ("<f4", (2,)))),
        "other shape": npy(np.zeros((2, 1), np.float32)),
        "0-d": npy(np.float32(1)),
        "huge shape": npy(header={**huge, "shape": (2**40,)}, data=w.tobytes()),
        "huger shape": npy(header={**huge, "shape": (10**30,)}, data=w.tobytes()),
        "negative shape": npy(header={**huge, "shape": (-2,)}, data=w.tobytes()),
        "header says 2, data 3": npy(header={**huge, "shape": (2,)}, data=w.tobytes() + b"\0" * 4),
        "header says 2, data 1": npy(header={**huge, "shape": (2,)}, data=w.tobytes()[:4]),
        "format 3.0": npy(w, version=(3, 0)),
        "not .npy": b"\x93NUMPY" + b"\xff" * 60,
        "empty": b"",
    }
    counts = {"loaded": 0, "refused": 0}
    bad = tmp_path / "bad.npz"
    for what, data in bad_params.items():
        for compression in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            write_zip(bad, {**members, "param_0.npy": data}, compression)
            try_load(opt, params, bad, saved, later, counts)
            assert counts["loaded"] == 0, what
    assert not marker.exists()
    # lossless conversions: a big-endian array, a Fortran-order one, a version 2.0 header, deflated
    for what, data in {"big-endian": npy(w.astype(">f4")), "version 2.0": npy(w, version=(2, 0))}.items():
        write_zip(bad, {**members, "param_0.npy": data}, zipfile.ZIP_DEFLATED)
        try_load(opt, params, bad, saved, later, counts)
    assert counts["loaded"] == 2


def test_fortran_order_and_byte_swapped_arrays_load_exactly(tmp_path):
    rng = np.random.default_rng(7)
    w = rng.standard_normal((3, 4))
    opt = fo.SGD([w], lr=0.1, momentum=0.9)
    opt.step([rng.standard_normal(w.shape)])
    fo.save(opt, tmp_path / "c.npz")
    members = members_of((tmp_path / "c.npz").read_bytes(), tmp_path)
    buf = opt.state[0]["momentum_buffer"].copy()
    for variant in (np.asfortranarray, lambda a: a.astype(">f8"), lambda a: np.asfortranarray(a.astype(">f8"))):
        write_zip(tmp_path / "v.npz", {**members, "param_0.npy": npy(variant(w)),
                                       "state_0_momentum_buffer.npy": npy(variant(buf))})
        w2 = np.zeros_like(w)
        opt2 = fo.SGD([w2], lr=0.1, momentum=0.9)
        fo.load(opt2, tmp_path / "v.npz")
        np.testing.assert_array_equal(w2, w, strict=True)
        np.testing.assert_array_equal(opt2.state[0]["momentum_buffer"], buf, strict=True)
        assert w2.dtype == np.float64 and w2.dtype.isnative


def test_unknown_encrypted_or_oddly_compressed_members_are_refused(tiny_case, tmp_path):
    good, saved, opt, params, later = tiny_case
    members = members_of(good, tmp_path)
    counts = {"loaded": 0, "refused": 0}
    bad = tmp_path / "bad.npz"
    cases = [
        {**members, "extra.npy": members["param_0.npy"]},
        {**members, "notes.txt": b"hello"},
        {k: v for k, v in members.items() if k != "state_1_max_exp_avg_sq.npy"},
        {**{k: v for k, v in members.items() if k != "param_0.npy"}, "param_0": members["param_0.npy"]},
    ]
    for case in cases:
        write_zip(bad, case)
        try_load(opt, params, bad, saved, later, counts)
    for method in (zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA):
        write_zip(bad, members, method)
        try_load(opt, params, bad, saved, later, counts)
    write_zip(bad, members)
    data = bytearray(bad.read_bytes())
    with zipfile.ZipFile(bad) as z:
        for info in z.infolist():  # set the "encrypted" flag in the directory
            at = data.index(b"PK\x01\x02" + data[z.start_dir + 4 : z.start_dir + 8], z.start_dir)
            break
    data[at + 8] |= 1
    bad.write_bytes(data)
    try_load(opt, params, bad, saved, later, counts)
    assert counts == {"loaded": 0, "refused": len(cases) + 3}


def test_a_compression_bomb_is_refused_without_being_decompressed(tiny_case, tmp_path):
    """A 64 MiB deflated member (zeros, 65 KB on disk) is refused, read or not, with little
    memory: an extra member, or one the optimizer expects with a declared size that is too big."""
    import tracemalloc

    good, saved, opt, params, later = tiny_case
    members = members_of(good, tmp_path)
    header = npy(header={"descr": "<f4", "fortran_order": False, "shape": (2**24,)})
    info = zipfile.ZipInfo("extra.npy")
    info.compress_type = zipfile.ZIP_DEFLATED
    bomb = tmp_path / "bomb.npz"
    counts = {"loaded": 0, "refused": 0}
    for name in ("extra.npy", "param_0.npy", "meta.npy"):
        with zipfile.ZipFile(bomb, "w") as z:
            for n, data in members.items():
                if n != name:
                    z.writestr(n, data)
            info.filename = info.orig_filename = name
            with z.open(info, "w", force_zip64=True) as f:
                f.write(header)
                zeros = b"\0" * (1 << 24)
                for _ in range(4):
                    f.write(zeros)
        assert bomb.stat().st_size < 2_000_000
        tracemalloc.start()
        try:
            try_load(opt, params, bomb, saved, later, counts)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20, (name, peak)
    assert counts == {"loaded": 0, "refused": 3}


def test_a_huge_declared_directory_is_refused_before_it_is_parsed(tiny_case, tmp_path):
    """An end record declaring a central directory far bigger than this optimizer's checkpoint
    could have (zipfile would read and parse all of it) is refused first."""
    good, saved, opt, params, later = tiny_case
    members = members_of(good, tmp_path)
    bad = tmp_path / "bad.npz"
    with zipfile.ZipFile(bad, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
        for k in range(3000):  # 3000 empty members: 160 KB of directory
            z.writestr(f"x{k}", b"")
    counts = {"loaded": 0, "refused": 0}
    try_load(opt, params, bad, saved, later, counts)
    with pytest.raises(CheckpointError, match="zip directory"):
        fo.load(opt, bad)
    assert counts["refused"] == 1


def test_load_checks_that_every_parameter_and_buffer_can_be_written_before_changing_anything(tmp_path):
    """A parameter, the FlatParams buffer or a state buffer made read-only after construction:
    load raises ValueError before the optimizer or any parameter changes."""
    rng = np.random.default_rng(8)
    cases = {"parameter": lambda opt, ps: ps[1], "list state buffer": lambda opt, ps: opt.state[1]["exp_avg"],
             "flat buffer": lambda opt, flat: flat.buffer,
             "flat state buffer": lambda opt, flat: opt._flat.buffers["exp_avg_sq"]}
    for what, readonly in cases.items():
        if what.startswith("flat"):
            params = model()
            opt = fo.Adam(params, lr=0.1)
            g, values = grads(params, rng), lambda: [params.buffer.copy()]
        else:
            params = [rng.standard_normal(4), rng.standard_normal(3)]
            opt = fo.Adam(params, lr=0.1)
            g, values = [rng.standard_normal(p.shape) for p in params], lambda: [p.copy() for p in params]
        opt.step(g)
        fo.save(opt, tmp_path / "c.npz")
        opt.step(g)
        before, was = opt.state_dict(), values()
        array = readonly(opt, params)
        array.flags.writeable = False
        with pytest.raises(ValueError, match="read-only"):
            fo.load(opt, tmp_path / "c.npz")
        after = opt.state_dict()
        assert after["step_count"] == before["step_count"] == 2, what
        for name, entry in before["state"].items():
            for k, v in entry.items():
                np.testing.assert_array_equal(after["state"][name][k], v, err_msg=what)
        for now, then in zip(values(), was):
            np.testing.assert_array_equal(now, then, err_msg=what)
        array.flags.writeable = True
        fo.load(opt, tmp_path / "c.npz")
        assert opt.step_count == 1


def test_save_through_a_symlink_replaces_its_target_atomically(tmp_path):
    flat = model()
    opt = make_opt(flat)
    target_dir = tmp_path / "store"
    target_dir.mkdir()
    target = target_dir / "ckpt-1.npz"
    target.write_bytes(b"old")
    os.chmod(target, 0o600)
    link = tmp_path / "latest.npz"
    link.symlink_to(target)
    fo.save(opt, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(target_dir)) == ["ckpt-1.npz"] and sorted(os.listdir(tmp_path)) == ["latest.npz", "store"]
    fo.load(make_opt(model(seed=3)), target)
