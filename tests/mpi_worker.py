"""Run by tests/test_distributed.py under ``mpiexec -n W``: sharded training scenarios whose
results rank 0 writes to ``OUT/result-W.pkl`` for the test to compare with one process.

The model, the param groups, every optimizer's options and each rank's gradients are defined
here (``SCENARIOS``, ``make_flat``, ``local_grad``) and imported by the test, which replays
them in one process on the averaged gradients. mpi4py is imported only in ``main``.
"""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np

import fastopt as fo

#: 2 ranks cut w2, 3 ranks cut w1 and w2 elsewhere: re-sharding copies from the middle of pieces
SHAPES = {"w1": (11, 9), "b1": 9, "w2": (9, 9), "b2": 5, "w3": (13,), "frozen": 3}
STEPS = 3


def make_flat(dtype=np.float32) -> fo.FlatParams:
    flat = fo.FlatParams(SHAPES, dtype)
    rng = np.random.default_rng(0)
    for name in flat:
        flat[name][...] = rng.standard_normal(flat[name].shape)
    return flat


def groups(flat, extra=None):
    """Two groups with different hyper-parameters; ``frozen`` is in no group."""
    return [{"params": flat.select("w*"), "weight_decay": 1e-2, **(extra or {})},
            {"params": flat.select("b*"), "weight_decay": 0.0, "lr": 0.05}]


def local_grad(flat, rank: int, step: int, nan: bool = False) -> fo.FlatParams:
    """Rank ``rank``'s gradient at ``step`` (zero padding); NaN in w2 when ``nan``."""
    g = flat.zeros_like()
    rng = np.random.default_rng(1000 * step + rank + 1)
    for name in g:
        g[name][...] = rng.standard_normal(g[name].shape) * (rank + 1)
    if nan:
        g["w2"][1, 2] = np.nan
    return g


def cosine(step: int) -> float:
    return 0.01 * (1 + np.cos(np.pi * min(step, 10) / 10)) / 2


#: name -> (optimizer class, options, first-group extras, dtype)
SCENARIOS = {
    "SGD": (fo.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}, None, np.float32),
    "Adagrad": (fo.Adagrad, {"lr": 0.1, "lr_decay": 0.01}, None, np.float32),
    "Adadelta": (fo.Adadelta, {"lr": 1.0}, None, np.float32),
    "RMSprop": (fo.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5}, None, np.float64),
    "Adam": (fo.Adam, {"lr": cosine, "amsgrad": True}, None, np.float32),
    "AdamW": (fo.AdamW, {"lr": 0.01}, {"betas": (0.8, 0.99)}, np.float64),
    "Adamax": (fo.Adamax, {"lr": 0.01}, None, np.float32),
    "NAdam": (fo.NAdam, {"lr": 0.01}, None, np.float32),
    "RAdam": (fo.RAdam, {"lr": 0.01, "maximize": True}, None, np.float32),
    "clip_skip": (fo.Adam, {"lr": 0.01, "clip_grad_norm": 1.0, "skip_nonfinite": True}, None, np.float32),
}
#: steps at which rank 1 (or rank 0 alone in one process) sends a NaN in clip_skip
NAN_STEPS = (1,)


def build(name, flat, sharded_cls=None, comm=None):
    cls, options, extra, _ = SCENARIOS[name]
    params = groups(flat, extra)
    if sharded_cls is None:
        return cls(params, **options)
    return sharded_cls(cls, params, comm, **options)


# -- damaged sharded checkpoints (each applied by rank 0 to a copy of a checkpoint's last file) --

def _rewrite(path, meta_edit=None, members=None):
    """Rewrite the shard file at ``path``: its metadata through ``meta_edit``, members replaced
    or added from ``members`` (name -> bytes)."""
    import json
    import zipfile

    with zipfile.ZipFile(path) as z:
        data = {n: z.read(n) for n in z.namelist()}
    if meta_edit is not None:
        import io

        meta = json.loads(np.load(io.BytesIO(data["meta.npy"])).tobytes())
        meta = meta_edit(meta)
        f = io.BytesIO()
        np.save(f, np.frombuffer(json.dumps(meta).encode(), np.uint8))
        data["meta.npy"] = f.getvalue()
    data.update(members or {})
    with zipfile.ZipFile(path, "w") as z:
        for n, d in data.items():
            z.writestr(n, d)


def _flip_params_byte(path):
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = z.getinfo("params.npy")
    raw = bytearray(open(path, "rb").read())
    at = info.header_offset
    name_len, extra_len = (int.from_bytes(raw[at + k : at + k + 2], "little") for k in (26, 28))
    start = at + 30 + name_len + extra_len
    raw[start + 130] ^= 0x10  # a byte of the first values, past the 128-byte .npy header
    open(path, "wb").write(bytes(raw))


def _huge_params(path):
    import io

    f = io.BytesIO()
    np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    _rewrite(path, members={"params.npy": f.getvalue() + b"\0" * 64})


def _piece(edit):
    def meta_edit(meta):
        edit(meta["pieces"][0])
        return meta
    return meta_edit


def _lone_file_of_a_huge_world(path):
    """Only one file, named as rank 0 of 10**12."""
    directory = os.path.dirname(path)
    lone = os.path.join(directory, "shard-00000-of-1000000000000.npz")
    os.replace(path, lone)
    for name in os.listdir(directory):
        if name != os.path.basename(lone):
            os.unlink(os.path.join(directory, name))


DAMAGES = {
    "extra member": lambda p: _rewrite(p, members={"extra.npy": b"\x93NUMPY" + b"\0" * 200}),
    "flipped data byte": _flip_params_byte,
    "truncated": lambda p: os.truncate(p, os.path.getsize(p) // 2),
    "huge declared params": _huge_params,
    "shard bounds": lambda p: _rewrite(p, lambda m: {**m, "lo": m["lo"] + 16}),
    "piece start": lambda p: _rewrite(p, _piece(lambda piece: piece.update(start=piece["start"] + 1))),
    "unknown buffer": lambda p: _rewrite(p, _piece(lambda piece: piece["buffers"].append("bogus"))),
    "piece not a dict": lambda p: _rewrite(p, lambda m: {**m, "pieces": [1] + m["pieces"][1:]}),
    "meta not an object": lambda p: _rewrite(p, lambda m: [m]),
    "huge lr": lambda p: _rewrite(p, lambda m: {**m, "param_groups": [{**g, "lr": 10**400}
                                                                      for g in m["param_groups"]]}),
    "step 2**70": lambda p: _rewrite(p, lambda m: {**m, "step_count": 2**70}),
    "a huge world": _lone_file_of_a_huge_world,
}


def main(out: str, load_from: str | None = None) -> None:
    from mpi4py import MPI

    from fastopt.distributed import ShardedOptimizer
    from fastopt.distributed_checkpoint import load_sharded, save_sharded

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    result = {"world": world, "runs": {}, "state_nbytes": {}}
    for name, (_, _, _, dtype) in SCENARIOS.items():
        flat = make_flat(dtype)
        opt = build(name, flat, ShardedOptimizer, comm)
        for step in range(STEPS):
            nan = name == "clip_skip" and step in NAN_STEPS and rank == min(1, world - 1)
            opt.step(local_grad(flat, rank, step, nan))
        full = opt.consolidated_state_dict(root=0)
        result["state_nbytes"][name] = comm.gather(opt.state_nbytes, root=0)
        if rank == 0:
            result["runs"][name] = {"params": flat.buffer.copy(), "state": full, "skipped": opt.skipped_steps,
                                    "step_count": opt.step_count, "norm": opt.last_grad_norm}
    # checkpoints: Adam, STEPS steps, saved sharded; then (re-)loaded and stepped once more
    flat = make_flat(np.float32)
    opt = build("Adam", flat, ShardedOptimizer, comm)
    for step in range(STEPS):
        opt.step(local_grad(flat, rank, step))
    save_sharded(opt, os.path.join(out, "ckpts", f"ckpt-{world}"))
    if load_from is not None:
        for source in sorted(os.listdir(load_from)):
            fresh = make_flat(np.float32)
            other = build("Adam", fresh, ShardedOptimizer, comm)
            load_sharded(other, os.path.join(load_from, source))
            other.step(local_grad(fresh, rank, STEPS))
            if rank == 0:
                result.setdefault("resumed", {})[source] = fresh.buffer.copy()
        # a consolidated dict written by one process loads into any world size
        with open(os.path.join(out, "single-state.pkl"), "rb") as f:
            single = pickle.load(f)
        fresh = make_flat(np.float32)
        other = build("Adam", fresh, ShardedOptimizer, comm)
        fresh.buffer[...] = single["params"]
        other.load_state_dict(single["state"])
        other.step(local_grad(fresh, rank, STEPS))
        if rank == 0:
            result["from_single"] = fresh.buffer.copy()
    # a model smaller than one aligned shard: the other ranks own nothing and still take part
    tiny = fo.FlatParams({"a": 5}, np.float32)
    tiny["a"][...] = np.arange(5)
    opt = ShardedOptimizer(fo.Adam, tiny, comm, lr=0.1)
    for step in range(STEPS):
        opt.step(local_grad(tiny, rank, step))
    full = opt.consolidated_state_dict(root=0)
    if rank == 0:
        result["tiny"] = {"params": tiny.buffer.copy(), "state": full}
    save_sharded(opt, os.path.join(out, f"tiny-{world}"))
    # argument errors are raised before any communication
    flat = make_flat(np.float32)
    opt = build("Adam", flat, ShardedOptimizer, comm)
    calls = {"grad_noise": lambda: ShardedOptimizer(fo.Adam, flat, comm, grad_noise=(0.1, 0.55)),
             "class": lambda: ShardedOptimizer(object, flat, comm),
             "align": lambda: ShardedOptimizer(fo.Adam, flat, comm, align=48),
             "lr": lambda: ShardedOptimizer(fo.Adam, flat, comm, lr=-1.0),
             "layout": lambda: opt.step(fo.FlatParams({"x": 3}).zeros_like()),
             "aliased": lambda: opt.step(flat)}
    result["errors"] = {}
    for label, call in calls.items():
        try:
            call()
            result["errors"][label] = None
        except Exception as exc:  # noqa: BLE001 - the test checks the type
            result["errors"][label] = type(exc).__name__
    # parameters start as rank 0's; a rank with another model makes every rank raise
    flat = make_flat(np.float32)
    flat.buffer[...] += rank
    ShardedOptimizer(fo.SGD, flat, comm, lr=0.1)
    result["broadcast"] = comm.gather(float(flat.buffer.sum() - make_flat(np.float32).buffer.sum()), root=0)
    try:
        ShardedOptimizer(fo.SGD, fo.FlatParams({"a": 5 + (rank == world - 1)}), comm, lr=0.1)
        mismatch = None
    except ValueError as exc:
        mismatch = str(exc)
    result["mismatch"] = comm.gather(mismatch, root=0)
    # a bad state dict raises on every rank and changes nothing
    flat = make_flat(np.float32)
    opt = build("Adam", flat, ShardedOptimizer, comm)
    before = flat.buffer.copy()
    try:
        opt.load_state_dict({"optimizer": "Adam", "format": 1, "param_groups": [], "state": {}})
        result["bad_load"] = "accepted"
    except ValueError as exc:
        result["bad_load"] = str(exc)
    # a missing checkpoint, and one of another model, raise on every rank and change nothing
    for label, where in (("missing", "nowhere"), ("foreign", f"tiny-{world}")):
        try:
            load_sharded(opt, os.path.join(out, where))
            result[f"{label}_load"] = None
        except (OSError, ValueError) as exc:
            result[f"{label}_load"] = comm.gather(f"{type(exc).__name__}: {exc}", root=0)
    result["bad_load_unchanged"] = bool(np.array_equal(before, flat.buffer))
    # damaged sharded checkpoints: CheckpointError on every rank, nothing changed on any
    import shutil

    source = os.path.join(out, "ckpts", f"ckpt-{world}")
    if rank == 0:
        for label, damage in DAMAGES.items():
            target = os.path.join(out, f"damaged-{world}", label)
            shutil.copytree(source, target)
            damage(os.path.join(target, f"shard-{world - 1:05d}-of-{world:05d}.npz"))
    comm.Barrier()
    result["damaged"] = {}
    for label in DAMAGES:
        try:
            load_sharded(opt, os.path.join(out, f"damaged-{world}", label))
            outcome = "loaded"
        except Exception as exc:  # noqa: BLE001 - the test checks the type
            outcome = f"{type(exc).__name__}: {exc}"
        result["damaged"][label] = comm.gather(outcome, root=0)
    state = opt.optimizer.state_dict()["state"] if opt.optimizer is not None else {}
    result["damaged_unchanged"] = comm.gather(
        bool(np.array_equal(before, flat.buffer)) and opt.step_count == 0
        and all(e["step"] == 0 and all(not np.any(v) for v in e.values() if isinstance(v, np.ndarray))
                for e in state.values()), root=0)
    # a save that fails on one rank raises on every rank and leaves the previous checkpoint
    kept = {n: open(os.path.join(source, n), "rb").read() for n in sorted(os.listdir(source))}
    savez = np.savez
    if rank == world - 1:
        def failing(*args, **kwargs):
            raise OSError("disk full")
        np.savez = failing
    try:
        save_sharded(opt, source)
        outcome = "saved"
    except Exception as exc:  # noqa: BLE001 - the test checks the type
        outcome = f"{type(exc).__name__}: {exc}"
    np.savez = savez
    result["failed_save"] = comm.gather(outcome, root=0)
    comm.Barrier()
    result["failed_save_kept"] = kept == {n: open(os.path.join(source, n), "rb").read()
                                          for n in sorted(os.listdir(source))}
    oks = comm.gather(result["bad_load"] != "accepted", root=0)
    if rank == 0:
        result["bad_load_all_ranks"] = all(oks)
        with open(os.path.join(out, f"result-{world}.pkl"), "wb") as f:
            pickle.dump(result, f)




# -- faults: one rank's failure must reach every rank -------------------------------------------
#: Seconds a fault case may take before the watchdog ends the job (a regression hangs in a
#: collective: the test then names the case and runs the ones after it in a new job).
CASE_TIMEOUT = float(os.environ.get("FASTOPT_FAULT_CASE_TIMEOUT", 20))


def _outcome(call):
    """None, or [type name, message, failed_ranks] of what ``call`` raised."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001 - the test checks type and message
        return [type(exc).__name__, str(exc), getattr(exc, "failed_ranks", None)]
    return None


def _grads(flat, rank, step=0, nan=False):
    return local_grad(flat, rank, step, nan)


def _fault_cases():
    """name -> case(comm, rank, world, bad) -> dict of this rank's observations: ``error``
    (what the faulty call raised), ``unchanged`` (parameters as before it), ``step_count``."""
    from fastopt.distributed import ShardedOptimizer
    from fastopt.distributed_checkpoint import load_sharded, save_sharded

    def adam(comm, flat=None, **options):
        flat = make_flat(np.float32) if flat is None else flat
        return flat, ShardedOptimizer(fo.Adam, groups(flat), comm, **{"lr": 0.01, **options})

    def faulty_step(comm, rank, bad, make_grad=None, before_step=None, **options):
        flat, opt = adam(comm, **options)
        if before_step is not None:
            before_step(opt, bad)
        before = flat.buffer.copy()
        g = _grads(flat, rank)
        if bad and make_grad is not None:
            g = make_grad(flat, g)
        error = _outcome(lambda: opt.step(g))
        seen = {"error": error, "unchanged": bool(np.array_equal(before, flat.buffer)) and opt.step_count == 0}
        if make_grad is not None:  # only the gradient was bad: the same optimizer steps next
            seen["opt"] = opt
        return seen

    def ctor(comm, bad, bad_options):
        flat = make_flat(np.float32)
        options = {"lr": 0.01, **(bad_options if bad else {})}
        cls = options.pop("cls", fo.Adam)
        return {"error": _outcome(lambda: ShardedOptimizer(cls, groups(flat), comm, **options))}

    def schedule(bad_value):
        """A schedule that is bad on the faulty rank (construction does not call it)."""
        def make(bad):
            def lr(step):
                return bad_value(step) if bad else 0.01
            return lr
        return make

    def edit(key, value, group=0):
        def before_step(opt, bad):
            if bad:
                opt.param_groups[group][key] = value
        return before_step

    def toggle_skip(opt, bad):
        if bad:
            opt.skip_nonfinite = True

    def load(comm, rank, bad, spoil):
        flat, opt = adam(comm)
        opt.step(_grads(flat, rank))
        full = opt.consolidated_state_dict(root=None)
        fresh, other = adam(comm)
        before = fresh.buffer.copy()
        sd = spoil(full) if bad else full
        return {"error": _outcome(lambda: other.load_state_dict(sd)),
                "unchanged": bool(np.array_equal(before, fresh.buffer)) and other.step_count == 0, "opt": other}

    def drop_state(sd):
        return {**sd, "state": {k: v for i, (k, v) in enumerate(sd["state"].items()) if i}}

    def save(comm, rank, bad, out):
        flat, opt = adam(comm)
        directory = os.path.join(out, f"fault-ckpt-{comm.Get_size()}")
        save_sharded(opt, directory)  # the checkpoint a failed save must leave intact
        opt.step(_grads(flat, rank))
        import fastopt.distributed_checkpoint as dc

        write = dc._write_temporary

        def cannot_write(path, arrays):
            raise OSError(28, "No space left on device", path)

        if bad:  # this rank cannot write its temporary file
            dc._write_temporary = cannot_write
        try:
            error = _outcome(lambda: save_sharded(opt, directory))
        finally:
            dc._write_temporary = write
        fresh, other = adam(comm)
        load_sharded(other, directory)
        return {"error": error, "unchanged": other.step_count == 0 and bool(np.array_equal(fresh.buffer,
                                                                                          make_flat().buffer)),
                "opt": other}

    def read_only(opt, bad):
        if bad:
            opt.flat.buffer.flags.writeable = False

    def remove_group(opt, bad):
        if bad:
            del opt.param_groups[1]

    def replace_params(opt, bad):
        if bad:
            opt.param_groups[0]["params"] = opt.param_groups[1]["params"]

    def read_only_ctor(comm, bad):
        flat = make_flat(np.float32)
        flat.buffer.flags.writeable = not bad
        return {"error": _outcome(lambda: ShardedOptimizer(fo.Adam, groups(flat), comm, lr=0.01))}

    def save_elsewhere(comm, rank, bad, out):
        flat, opt = adam(comm)
        directory = os.path.join(out, f"elsewhere-{comm.Get_size()}-{int(bad)}")
        return {"error": _outcome(lambda: save_sharded(opt, directory)),
                "unchanged": not os.path.exists(directory) or not os.listdir(directory)}

    def load_other_checkpoint(comm, rank, bad, out):
        world = comm.Get_size()
        for label, shift in (("a", 0.0), ("b", 1.0)):  # two checkpoints of the same step count
            flat = make_flat(np.float32)
            flat.buffer[...] += shift
            save_sharded(ShardedOptimizer(fo.Adam, groups(flat), comm, lr=0.01),
                         os.path.join(out, f"other-{world}-{label}"))
        fresh, other = adam(comm)
        before = fresh.buffer.copy()
        error = _outcome(lambda: load_sharded(other, os.path.join(out, f"other-{world}-{'b' if bad else 'a'}")))
        return {"error": error, "unchanged": bool(np.array_equal(before, fresh.buffer)), "opt": other}

    def two_ranks_fail(comm, rank, world, bad):
        flat, opt = adam(comm)
        before = flat.buffer.copy()
        g = _grads(flat, rank)
        if rank == 0:
            g = g.buffer.astype(np.float64)  # TypeError here, ValueError on the last rank
        elif bad:
            g = np.zeros(3, np.float32)
        return {"error": _outcome(lambda: opt.step(g)), "unchanged": bool(np.array_equal(before, flat.buffer)),
                "opt": opt}

    return {
        "two_ranks_fail": lambda comm, rank, world, bad, out: two_ranks_fail(comm, rank, world, bad),
        "read_only_at_construction": lambda comm, rank, world, bad, out: read_only_ctor(comm, bad),
        "read_only_before_step": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, before_step=read_only),
        "group_removed": lambda comm, rank, world, bad, out: faulty_step(comm, rank, bad, before_step=remove_group),
        "group_params_replaced": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, before_step=replace_params),
        "save_other_directory": lambda comm, rank, world, bad, out: save_elsewhere(comm, rank, bad, out),
        "load_other_checkpoint": lambda comm, rank, world, bad, out: load_other_checkpoint(comm, rank, bad, out),
        "grad_size": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, lambda flat, g: np.zeros(flat.buffer.size + 16, np.float32)),
        "grad_dtype": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, lambda flat, g: g.buffer.astype(np.float64)),
        "grad_aliased": lambda comm, rank, world, bad, out: faulty_step(comm, rank, bad, lambda flat, g: flat),
        "nan_on_one_rank": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, lambda flat, g: _grads(flat, rank, nan=True), skip_nonfinite=True),
        "skip_nonfinite_on_one_rank": lambda comm, rank, world, bad, out: ctor(comm, bad, {"skip_nonfinite": True}),
        "skip_nonfinite_toggled_on_one_rank": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, before_step=toggle_skip),
        "clip_on_one_rank": lambda comm, rank, world, bad, out: ctor(comm, bad, {"clip_grad_norm": 1.0}),
        "invalid_lr_at_construction": lambda comm, rank, world, bad, out: ctor(comm, bad, {"lr": -1.0}),
        "invalid_class_at_construction": lambda comm, rank, world, bad, out: ctor(comm, bad, {"cls": object}),
        "different_lr_at_construction": lambda comm, rank, world, bad, out: ctor(comm, bad, {"lr": 0.02}),
        "different_default_spelled_out": lambda comm, rank, world, bad, out: ctor(  # equal: accepted
            comm, bad, {"eps": 1e-8, "betas": [0.9, 0.999]}),
        "invalid_group_edit": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, before_step=edit("lr", -1.0)),
        "wrong_type_group_edit": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, before_step=edit("betas", "x")),
        "different_group_edit": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, before_step=edit("weight_decay", 0.5, group=1)),
        "schedule_differs": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, lr=schedule(lambda step: 0.02)(bad)),
        "schedule_invalid": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, lr=schedule(lambda step: float("nan"))(bad)),
        "schedule_raises": lambda comm, rank, world, bad, out: faulty_step(
            comm, rank, bad, lr=schedule(lambda step: 1 / 0)(bad)),
        "load_bad_dict": lambda comm, rank, world, bad, out: load(comm, rank, bad, drop_state),
        "load_not_a_dict": lambda comm, rank, world, bad, out: load(comm, rank, bad, lambda sd: None),
        "load_other_step_count": lambda comm, rank, world, bad, out: load(
            comm, rank, bad, lambda sd: {**sd, "step_count": 7}),
        "gather_other_root": lambda comm, rank, world, bad, out: {
            "error": _outcome(lambda: adam(comm)[1].consolidated_state_dict(root=int(bad)))},
        "save_fails_on_one_rank": lambda comm, rank, world, bad, out: save(comm, rank, bad, out),
    }


def faults(out: str, skip: set[str]) -> None:
    """Run every fault case not in ``skip``; rank 0 rewrites ``OUT/faults-W.pkl`` after each."""
    import faulthandler

    from mpi4py import MPI

    from fastopt.distributed import ShardedOptimizer

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    faulthandler.dump_traceback_later(300, exit=True)  # compiling the kernels, the first time
    for cls in (fo.Adam, fo.SGD):  # warm up: compile outside the timed cases
        flat = make_flat(np.float32)
        ShardedOptimizer(cls, groups(flat), comm, lr=0.01).step(_grads(flat, rank))
    path = os.path.join(out, f"faults-{world}.pkl")
    results = {}
    if os.path.exists(path):
        with open(path, "rb") as f:
            results = pickle.load(f)
    for name, case in _fault_cases().items():
        if name in skip:
            continue
        faulthandler.dump_traceback_later(CASE_TIMEOUT, exit=True)
        if rank == 0:
            print(f"fault case {name}", file=sys.stderr, flush=True)
        seen = case(comm, rank, world, rank == world - 1, out)
        opt = seen.pop("opt", None)
        # afterwards the ranks are still in step: a valid step works and leaves equal parameters
        if opt is None:
            flat = make_flat(np.float32)
            opt = ShardedOptimizer(fo.Adam, groups(flat), comm, lr=0.01)
        before = opt.step_count
        opt.step(_grads(opt.flat, rank, 1))
        seen["then_stepped"] = opt.step_count == before + 1
        seen["checksum"] = float(np.sum(opt.flat.buffer.astype(np.float64) * np.arange(opt.flat.buffer.size)))
        gathered = comm.gather(seen, root=0)
        if rank == 0:
            results[name] = gathered
            with open(path + ".tmp", "wb") as f:
                pickle.dump(results, f)
            os.replace(path + ".tmp", path)
    faulthandler.cancel_dump_traceback_later()


def after_agreement_failure() -> None:
    """A failure on one rank after the ranks agreed to step: that rank aborts the job."""
    from mpi4py import MPI

    from fastopt.distributed import ShardedOptimizer

    comm = MPI.COMM_WORLD
    rank, world = comm.Get_rank(), comm.Get_size()
    flat = make_flat(np.float32)
    opt = ShardedOptimizer(fo.Adam, groups(flat), comm, lr=0.01)
    if rank == world - 1:
        def broken(grads):
            raise MemoryError("simulated: the update failed after the ranks agreed")
        opt.optimizer.step = broken
    opt.step(_grads(flat, rank))
    comm.Barrier()
    print("not aborted", flush=True)


def uncaught(install: str) -> None:
    """An exception outside fastopt on one rank while the others wait in a collective."""
    from mpi4py import MPI

    from fastopt.distributed import abort_on_exception

    comm = MPI.COMM_WORLD
    if install == "hook":
        abort_on_exception(comm)
    if comm.Get_rank() == comm.Get_size() - 1:
        raise RuntimeError("a user error outside fastopt")
    comm.Barrier()
    print("not aborted", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "faults":
        faults(sys.argv[2], set(sys.argv[3:]))
    elif sys.argv[1] == "after_agreement_failure":
        after_agreement_failure()
    elif sys.argv[1] == "uncaught":
        uncaught(sys.argv[2])
    else:
        main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
