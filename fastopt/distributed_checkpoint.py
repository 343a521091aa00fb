"""Sharded checkpoints of a :class:`~fastopt.distributed.ShardedOptimizer`: one file per rank,
loadable with any number of ranks.

:func:`save_sharded` has every rank write ``shard-<rank>-of-<world>.npz`` (atomically, as
:func:`fastopt.save` does) into one directory: its slice of the parameter buffer and the state
of the tensor pieces in its shard, with JSON metadata (layout, optimizer, hyper-parameters,
step counts, each piece's place in its tensor). No rank gathers the whole state.

:func:`load_sharded` re-shards: each rank reads the metadata of every file, then only the
state arrays that overlap its own shard (``np.load`` reads ``.npz`` members lazily), so a
checkpoint written by 3 ranks loads into 2, 1 or 4. The parameters are replicated, so each
rank reads every file's parameter slice. Everything is checked on every rank and the ranks
agree before any of them changes: a missing, foreign or damaged file raises everywhere and
leaves every optimizer and the parameters as they were.
"""

from __future__ import annotations

import glob
import json
import os
import re

import numpy as np

from .checkpoint import (
    _MAX_STEP,
    CheckpointError,
    _Archive,
    _buffer_names,
    _discard,
    _jsonable,
    _meta_limit,
    _replace,
    _short,
    _tuples,
    _write_temporary,
    _writeable,
)
from .distributed import ShardedOptimizer, _shard_layout, agree

#: Version of the sharded checkpoint layout.
SHARDED_VERSION = 1
_NAME = re.compile(r"shard-(\d+)-of-(\d+)\.npz$")


def _file(directory: str, rank: int, world: int) -> str:
    return os.path.join(directory, f"shard-{rank:05d}-of-{world:05d}.npz")


def save_sharded(opt: ShardedOptimizer, directory: str | os.PathLike) -> str:
    """Write this rank's part of the checkpoint into ``directory`` (created if missing).

    Collective: every rank calls it with the same directory. Returns this rank's file path.
    Every rank writes and fsyncs a temporary file beside its shard file; only once every rank
    has, each renames its own over its shard file (and fsyncs the directory). An error on any
    rank raises on every rank; one while writing leaves the previous checkpoint as it was.
    Files of another world size already in ``directory`` are then removed by rank 0, so the
    directory holds one consistent checkpoint.
    """
    if not isinstance(opt, ShardedOptimizer):
        raise TypeError(f"save_sharded() takes a ShardedOptimizer, got {type(opt).__name__}")
    directory = os.fspath(directory)
    error, path, arrays, written = None, None, None, None
    try:  # everything this rank can check before writing; rank 0 makes the directory
        arrays = _contents(opt)
        path = _file(directory, opt.rank, opt.world_size)
        if opt.rank == 0:
            os.makedirs(directory, exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - reaches every rank through agree(), then raised
        error = exc
    agree(opt.comm, "save_sharded()", error, [{"directory": directory}], ["checkpoint directory"])
    try:  # every rank writes and fsyncs a temporary file; the old checkpoint stays until all have
        written = _write_temporary(path, arrays)
    except Exception as exc:  # noqa: BLE001 - a rank that cannot write must not leave the others waiting
        error = exc
    try:
        agree(opt.comm, "save_sharded(): writing a shard file (no file was replaced)", error)
    except BaseException:
        if written is not None:
            _discard(written[0])
        raise
    try:
        _replace(*written)
    except Exception as exc:  # noqa: BLE001 - as above
        error = exc
    agree(opt.comm, "save_sharded(): renaming a shard file", error)
    try:
        if opt.rank == 0:
            _remove_other_worlds(opt, directory)
    except OSError as exc:
        error = exc
    agree(opt.comm, "save_sharded(): removing shard files of another world size", error)
    return path


def _remove_other_worlds(opt: ShardedOptimizer, directory: str) -> None:
    for other in glob.glob(os.path.join(directory, "shard-*-of-*.npz")):
        m = _NAME.search(other)
        if m and int(m.group(2)) != opt.world_size:
            os.unlink(other)


def _contents(opt: ShardedOptimizer) -> dict[str, np.ndarray]:
    """This rank's arrays of a sharded checkpoint, ``meta`` included."""
    layout = opt.flat.layout
    arrays = {"params": opt.flat.buffer[opt.lo : opt.hi]}
    pieces = []
    groups = []
    if opt.optimizer is not None:
        sd = opt.optimizer.state_dict()
        groups = [{k: _jsonable(v, f"option {k!r}") for k, v in g.items() if k != "params"}
                  for g in sd["param_groups"]]
        for i, (name, entry) in enumerate(sd["state"].items()):
            buffers, scalars = [], {}
            for k, v in entry.items():
                if isinstance(v, np.ndarray):
                    arrays[f"state_{i}_{k}"] = v.reshape(-1)
                    buffers.append(k)
                else:
                    scalars[k] = _jsonable(v, f"state {k!r} of {name!r}")
            pieces.append({"name": name, "start": opt._piece_start[name],
                           "size": int(opt.shard.layout.sizes[opt.shard.layout.index(name)]),
                           "scalars": scalars, "buffers": buffers})
    meta = {"fastopt_sharded": SHARDED_VERSION, "optimizer": opt.optimizer_cls.__name__,
            "world_size": opt.world_size, "rank": opt.rank, "lo": opt.lo, "hi": opt.hi,
            "step_count": opt.step_count, "names": list(layout.names),
            "shapes": [list(s) for s in layout.shapes], "dtype": str(layout.dtype), "size": layout.size,
            "groups": [list(sel.names) for sel, _ in opt._groups], "param_groups": groups, "pieces": pieces}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return arrays


def _pieces(opt: ShardedOptimizer, lo: int, hi: int) -> dict[str, tuple[int, int]]:
    """name -> (start in its tensor, size) of every piece whose state a rank with the shard
    ``[lo, hi)`` saves: the pieces of tensors in a param group."""
    shard, starts = _shard_layout(opt.flat.layout, lo, hi)
    grouped = {n for sel, _ in opt._groups for n in sel.names}
    return {n: (starts[n], size) for n, size in zip(shard.names, shard.sizes) if n in grouped}


def _check_meta(opt: ShardedOptimizer, meta, path: str, rank: int, world: int) -> dict:
    """``meta`` of shard file ``rank`` of ``world``, checked field by field against ``opt``."""
    layout = opt.flat.layout
    fields = {"fastopt_sharded": int, "optimizer": str, "world_size": int, "rank": int, "lo": int, "hi": int,
              "step_count": int, "names": list, "shapes": list, "dtype": str, "size": int, "groups": list,
              "param_groups": list, "pieces": list}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} has malformed sharded checkpoint metadata")
    if meta.get("fastopt_sharded") != SHARDED_VERSION or type(meta.get("fastopt_sharded")) is not int:
        raise CheckpointError(f"{path} is not a sharded fastopt checkpoint of version {SHARDED_VERSION}")
    for field, kind in fields.items():
        if type(meta.get(field)) is not kind:
            raise CheckpointError(f"{path} has malformed metadata: {field!r} is {type(meta.get(field)).__name__}, "
                                  f"not {kind.__name__}")
    if meta["rank"] != rank or meta["world_size"] != world:
        raise CheckpointError(f"{path} says it is rank {_short(meta['rank'])} of {_short(meta['world_size'])}")
    if meta["optimizer"] != opt.optimizer_cls.__name__:
        raise CheckpointError(f"{path} holds a {_short(meta['optimizer'])} state, not {opt.optimizer_cls.__name__}")
    if (meta["names"] != list(layout.names) or meta["shapes"] != [list(s) for s in layout.shapes]
            or meta["dtype"] != str(layout.dtype) or meta["size"] != layout.size):
        raise CheckpointError(f"{path} is a checkpoint of another model (tensor names, shapes or dtype differ)")
    if meta["groups"] != [list(sel.names) for sel, _ in opt._groups]:
        raise CheckpointError(f"{path} has param groups {_short(meta['groups'])}, this optimizer has "
                              f"{[list(sel.names) for sel, _ in opt._groups]}")
    if not 0 <= meta["step_count"] <= _MAX_STEP:
        raise CheckpointError(f"{path}: step_count {_short(meta['step_count'])} is not in [0, 2**63)")
    if not 0 <= meta["lo"] <= meta["hi"] <= layout.size:
        raise CheckpointError(f"{path}: shard [{_short(meta['lo'])}, {_short(meta['hi'])}) is not within the buffer")
    expected = _pieces(opt, meta["lo"], meta["hi"])
    known = _buffer_names(opt.optimizer_cls)
    seen = set()
    for piece in meta["pieces"]:
        name = piece.get("name") if type(piece) is dict else None
        if not (type(name) is str and name in expected and name not in seen
                and [piece.get("start"), piece.get("size")] == list(expected[name])
                and type(piece.get("scalars")) is dict and type(piece.get("buffers")) is list):
            raise CheckpointError(f"{path} has a malformed or unexpected state piece {_short(piece)}")
        seen.add(piece["name"])
        scalars, buffers = piece["scalars"], piece["buffers"]
        step = scalars.get("step")
        if not all(type(v) in (bool, int, float) for v in scalars.values()) or not (
                type(step) is int and 0 <= step <= _MAX_STEP):
            raise CheckpointError(f"{path}: piece {piece['name']!r} has scalars {_short(scalars)}, "
                                  "not numbers with a step")
        if not all(type(k) is str and k in known for k in buffers) or len(set(buffers)) != len(buffers) or (
                set(buffers) & set(scalars)):
            raise CheckpointError(f"{path}: piece {piece['name']!r} lists state buffers {_short(buffers)}; "
                                  f"{opt.optimizer_cls.__name__} keeps at most {sorted(known)}, each once")
    if seen != set(expected):
        raise CheckpointError(f"{path} holds the state of pieces {_short(sorted(seen))}, its shard has "
                              f"{_short(sorted(expected))}")
    if not (all(type(g) is dict for g in meta["param_groups"])
            and len(meta["param_groups"]) == (len(opt._groups) if expected else 0)):
        raise CheckpointError(f"{path} has hyper-parameters for {len(meta['param_groups'])} param groups")
    return meta


def _open_all(opt: ShardedOptimizer, directory: str, files: list) -> None:
    """Open every shard file of ``directory`` and check its metadata against ``opt`` and the
    other files, appending ``(archive, meta)`` to ``files`` (the caller closes them, also after
    an error). Only the metadata is read here."""
    paths = sorted(p for p in glob.glob(os.path.join(directory, "shard-*-of-*.npz")) if _NAME.search(p))
    if not paths:
        raise FileNotFoundError(f"no sharded checkpoint (shard-*-of-*.npz) in {directory}")
    world = {int(_NAME.search(p).group(2)) for p in paths}
    if len(world) != 1:
        raise CheckpointError(f"{directory} mixes checkpoints of world sizes {sorted(world)}")
    world = world.pop()
    if not 1 <= world <= len(paths):  # before listing the names a world size implies
        raise CheckpointError(f"{directory} holds {len(paths)} shard file(s) of a world of {world}")
    expected = [_file(directory, r, world) for r in range(world)]
    missing = [p for p in expected if p not in paths]
    if missing:
        raise CheckpointError(f"{directory} lacks {len(missing)} shard file(s) of {world}, e.g. {missing[0]}")
    layout = opt.flat.layout
    max_members = 2 + len(layout.names) * len(_buffer_names(opt.optimizer_cls))
    meta_limit = _meta_limit(len(layout.names), len(opt._groups))
    for r, path in enumerate(expected):
        archive = _Archive(path, max_members)
        files.append((archive, None))
        raw = archive.read("meta", np.uint8, max_size=meta_limit)
        try:
            meta = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path} has unreadable metadata: {exc}") from None
        meta = _check_meta(opt, meta, path, r, world)
        archive.expect({"meta", "params", *(f"state_{i}_{k}" for i, piece in enumerate(meta["pieces"])
                                            for k in piece["buffers"])})
        files[-1] = (archive, meta)
    metas = [m for _, m in files]
    if [m["lo"] for m in metas] != [0] + [m["hi"] for m in metas[:-1]] or metas[-1]["hi"] != layout.size:
        raise CheckpointError(f"the shard files of {directory} do not tile the parameter buffer in rank order")
    steps = {m["step_count"] for m in metas}
    if len(steps) != 1:
        raise CheckpointError(f"the shard files of {directory} are from different steps {sorted(steps)}")
    hyper = [m["param_groups"] for m in metas if m["param_groups"]]
    if any(h != hyper[0] for h in hyper):
        raise CheckpointError(f"the shard files of {directory} hold different hyper-parameters")


def _local_state(opt: ShardedOptimizer, files) -> tuple[dict, np.ndarray]:
    """This rank's shard state dict and the whole parameter buffer, from the checked files."""
    params = np.empty_like(opt.flat.buffer)
    for archive, meta in files:
        lo, hi = meta["lo"], meta["hi"]
        params[lo:hi] = archive.read("params", params.dtype, (hi - lo,))
    group_hp = next((m["param_groups"] for _, m in files if m["param_groups"]), None)
    if group_hp is None:
        raise CheckpointError("no shard file holds optimizer state")
    state: dict[str, dict] = {}
    if opt.optimizer is not None:
        mine = {n for g in opt.optimizer.param_groups for n in g["params"].names}
        for name in mine:
            start = opt._piece_start[name]
            n = opt.shard.layout.sizes[opt.shard.layout.index(name)]
            entry: dict = {}
            filled = 0
            for archive, meta in files:
                for i, piece in enumerate(meta["pieces"]):
                    if piece["name"] != name:
                        continue
                    a, b = max(start, piece["start"]), min(start + n, piece["start"] + piece["size"])
                    if a >= b:
                        continue
                    if not entry:
                        entry.update(piece["scalars"])
                    for k in piece["buffers"]:
                        if k not in entry:
                            entry[k] = np.zeros(n, params.dtype)
                        src = archive.read(f"state_{i}_{k}", params.dtype, (piece["size"],))
                        entry[k][a - start : b - start] = src[a - piece["start"] : b - piece["start"]]
                    filled += b - a
            if filled != n:
                raise CheckpointError(f"the shard files hold {filled} of the {n} state elements of {name!r} "
                                      "this rank needs")
            state[name] = entry
    groups = []
    for (sel, _), hp in zip(opt._groups, group_hp):
        hp = {k: _tuples(v) for k, v in hp.items()}
        groups.append({**hp, "params": [n for n in sel.names if n in opt._piece_start]})
    sd = {"optimizer": opt.optimizer_cls.__name__, "format": 1, "step_count": files[0][1]["step_count"],
          "param_groups": groups, "state": state}
    if opt.optimizer is not None:
        try:
            opt.optimizer._check_state_dict(sd)
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise CheckpointError(f"the sharded checkpoint does not fit this optimizer: {exc}") from None
    if not _writeable(opt.flat.buffer) or not all(
            _writeable(b) for b in (opt.optimizer._flat.buffers.values() if opt.optimizer is not None else ())):
        raise ValueError("load_sharded() cannot write the parameters or the state: made read-only")
    return sd, params


def load_sharded(opt: ShardedOptimizer, directory: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save_sharded` with any number of ranks.

    Collective. Restores the parameters (every rank's whole buffer), this rank's optimizer
    state and the step count; a schedule ``lr`` is kept (it is not saved).

    The files are untrusted input, read as :func:`fastopt.load` reads one: each rank checks
    every file's zip directory and metadata against the optimizer (layout, groups, each
    rank's bounds tiling the buffer, each state piece's place and buffers), refuses unknown
    members, and reads only the parameters and the state pieces it needs, each checked
    (declared size, ``.npy`` header) before its data is read, CRC verified. A damaged,
    truncated or foreign checkpoint raises :class:`~fastopt.CheckpointError` on every rank
    (a missing one ``FileNotFoundError``; a read-only parameter buffer ``ValueError``) and
    changes nothing on any rank.
    """
    if not isinstance(opt, ShardedOptimizer):
        raise TypeError(f"load_sharded() takes a ShardedOptimizer, got {type(opt).__name__}")
    directory = os.fspath(directory)
    files: list = []

    def prepare():
        _open_all(opt, directory, files)
        return _local_state(opt, files)

    try:
        opt._agree_and_load(prepare, "load_sharded()")
    finally:
        for archive, _ in files:
            archive.close()


__all__ = ["SHARDED_VERSION", "load_sharded", "save_sharded"]
