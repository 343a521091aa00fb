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
import zipfile

import numpy as np

from .checkpoint import CheckpointError, _jsonable
from .distributed import ShardedOptimizer, agree

#: Version of the sharded checkpoint layout.
SHARDED_VERSION = 1
_NAME = re.compile(r"shard-(\d+)-of-(\d+)\.npz$")


def _file(directory: str, rank: int, world: int) -> str:
    return os.path.join(directory, f"shard-{rank:05d}-of-{world:05d}.npz")


def save_sharded(opt: ShardedOptimizer, directory: str | os.PathLike) -> str:
    """Write this rank's part of the checkpoint into ``directory`` (created if missing).

    Collective: every rank calls it with the same directory (checked). Returns this rank's
    file path. Every rank writes a temporary file; only when every rank has written its file
    do the ranks rename theirs into place, so a rank that cannot write (a full disk, a
    directory it cannot reach) makes every rank raise and leaves the previous checkpoint in
    ``directory`` as it was. Files of another world size already in ``directory`` are removed
    by rank 0 after every rank has written, so the directory holds one consistent checkpoint.
    """
    if not isinstance(opt, ShardedOptimizer):
        raise TypeError(f"save_sharded() takes a ShardedOptimizer, got {type(opt).__name__}")
    directory = os.fspath(directory)
    error, path, arrays = None, None, None
    try:  # everything this rank can check before writing; rank 0 makes the directory
        arrays = _shard_arrays(opt)
        path = _file(directory, opt.rank, opt.world_size)
        if opt.rank == 0:
            os.makedirs(directory, exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - reaches every rank through agree(), then raised
        error = exc
    agree(opt.comm, "save_sharded()", error, [{"directory": directory}], ["checkpoint directory"])
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        try:  # every rank writes a temporary file; the old checkpoint stays until all have
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
        except Exception as exc:  # noqa: BLE001 - a rank that cannot write must not leave the others waiting
            error = exc
        agree(opt.comm, "save_sharded()", error)
        try:
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001 - as above
            error = exc
    finally:
        try:
            if os.path.exists(tmp):
                os.unlink(tmp)
        except OSError:
            pass
    agree(opt.comm, "save_sharded()", error)  # every shard is written, or every rank raises
    error = None
    if opt.rank == 0:
        try:
            for other in glob.glob(os.path.join(directory, "shard-*-of-*.npz")):
                m = _NAME.search(other)
                if m and int(m.group(2)) != opt.world_size:
                    os.unlink(other)
        except OSError as exc:
            error = exc
    agree(opt.comm, "save_sharded()", error)
    return path


def _shard_arrays(opt: ShardedOptimizer) -> dict[str, np.ndarray]:
    """The arrays of this rank's shard file: its parameter slice, its state pieces and the
    JSON metadata."""
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


def _open(path: str):
    try:
        npz = np.load(path, allow_pickle=False)
        meta = json.loads(npz["meta"].tobytes().decode())
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a readable sharded fastopt checkpoint: {exc}") from None
    if not isinstance(meta, dict) or meta.get("fastopt_sharded") != SHARDED_VERSION:
        raise CheckpointError(f"{path} is not a sharded fastopt checkpoint of version {SHARDED_VERSION}")
    return npz, meta


def _read_all(opt: ShardedOptimizer, directory: str):
    """Every file's metadata (checked against ``opt``) and open ``.npz`` handles."""
    paths = sorted(p for p in glob.glob(os.path.join(directory, "shard-*-of-*.npz")) if _NAME.search(p))
    if not paths:
        raise FileNotFoundError(f"no sharded checkpoint (shard-*-of-*.npz) in {directory}")
    world = {int(_NAME.search(p).group(2)) for p in paths}
    if len(world) != 1:
        raise CheckpointError(f"{directory} mixes checkpoints of world sizes {sorted(world)}")
    world = world.pop()
    expected = [_file(directory, r, world) for r in range(world)]
    missing = [p for p in expected if p not in paths]
    if missing:
        raise CheckpointError(f"{directory} lacks {len(missing)} shard file(s) of {world}, e.g. {missing[0]}")
    layout = opt.flat.layout
    files = []
    for r, path in enumerate(expected):
        npz, meta = _open(path)
        files.append((npz, meta))
        if meta["rank"] != r or meta["world_size"] != world:
            raise CheckpointError(f"{path} says it is rank {meta['rank']} of {meta['world_size']}")
        if meta["optimizer"] != opt.optimizer_cls.__name__:
            raise ValueError(f"{path} holds a {meta['optimizer']} state, not {opt.optimizer_cls.__name__}")
        if (meta["names"] != list(layout.names) or meta["shapes"] != [list(s) for s in layout.shapes]
                or meta["dtype"] != str(layout.dtype) or meta["size"] != layout.size):
            raise ValueError(f"{path} is a checkpoint of another model (tensor names, shapes or dtype differ)")
        if meta["groups"] != [list(sel.names) for sel, _ in opt._groups]:
            raise ValueError(f"{path} has param groups {meta['groups']}, this optimizer has "
                             f"{[list(sel.names) for sel, _ in opt._groups]}")
    steps = {m["step_count"] for _, m in files}
    if len(steps) != 1:
        raise CheckpointError(f"the shard files of {directory} are from different steps {sorted(steps)}")
    return files


def _local_state(opt: ShardedOptimizer, files) -> tuple[dict, np.ndarray]:
    """This rank's shard state dict and the whole parameter buffer, from the open files."""
    params = np.empty_like(opt.flat.buffer)
    covered = 0
    for npz, meta in files:
        lo, hi = meta["lo"], meta["hi"]
        part = npz["params"]
        if part.shape != (hi - lo,) or part.dtype != params.dtype:
            raise CheckpointError(f"shard {meta['rank']}: parameters of shape {part.shape}, expected {(hi - lo,)}")
        params[lo:hi] = part
        covered += hi - lo
    if covered != params.size:
        raise CheckpointError("the shard files do not cover the parameter buffer")
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
            for npz, meta in files:
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
                        src = npz[f"state_{i}_{k}"]
                        entry[k][a - start : b - start] = src[a - piece["start"] : b - piece["start"]]
                    filled += b - a
            if filled != n:
                raise CheckpointError(f"the shard files hold {filled} of the {n} state elements of {name!r} "
                                      "this rank needs")
            state[name] = entry
    groups = []
    for (sel, _), hp in zip(opt._groups, group_hp):
        hp = {k: (tuple(v) if isinstance(v, list) else v) for k, v in hp.items()}
        groups.append({**hp, "params": [n for n in sel.names if n in opt._piece_start]})
    sd = {"optimizer": opt.optimizer_cls.__name__, "format": 1, "step_count": files[0][1]["step_count"],
          "param_groups": groups, "state": state}
    return sd, params


def load_sharded(opt: ShardedOptimizer, directory: str | os.PathLike) -> None:
    """Load a checkpoint written by :func:`save_sharded` with any number of ranks.

    Collective. Restores the parameters (every rank's whole buffer), this rank's optimizer
    state and the step count; a schedule ``lr`` is kept (it is not saved).
    """
    if not isinstance(opt, ShardedOptimizer):
        raise TypeError(f"load_sharded() takes a ShardedOptimizer, got {type(opt).__name__}")
    directory = os.fspath(directory)
    files = []

    def prepare():
        files.extend(_read_all(opt, directory))
        return _local_state(opt, files)

    try:
        opt._agree_and_load(prepare, "load_sharded()")
    finally:
        for npz, _ in files:
            npz.close()


__all__ = ["SHARDED_VERSION", "load_sharded", "save_sharded"]
