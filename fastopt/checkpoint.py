"""Checkpoints: an optimizer's parameters, state, hyper-parameters and step in one ``.npz``.

:func:`save` writes a NumPy ``.npz`` (a zip of ``.npy`` arrays, no pickle) atomically: it
writes a temporary file in the target's directory, flushes and fsyncs it, and renames it over
the target with :func:`os.replace`. A process killed while saving leaves the previous
checkpoint as it was (plus, at worst, a stray ``.<name>.*.tmp`` file beside it).

:func:`load` reads the whole file, checks it against the optimizer (kind, parameter names or
positions, shapes, dtypes, state buffers, hyper-parameters) and only then copies it in: a
truncated, damaged or foreign file raises :class:`CheckpointError` (a ``ValueError``), a
checkpoint of another model or optimizer a ``ValueError``/``TypeError``, and in every case the
optimizer and its parameters are left as they were.

File layout (version 1): an array ``meta`` holding UTF-8 JSON (checkpoint version, optimizer
class, state format, step count, parameter keys, each group's hyper-parameters and each
parameter's step and host scalars), ``param_<i>`` for each parameter and
``state_<i>_<buffer>`` for each state buffer, where ``i`` numbers the parameters group by
group, as ``torch.optim`` does. Keys are tensor names for an optimizer over a
:class:`~fastopt.FlatParams` and positions for one over a list of arrays. A schedule ``lr``
(a callable) is not saved; loading keeps the optimizer's own.
"""

from __future__ import annotations

import contextlib
import json
import numbers
import os
import tempfile
import zipfile
import zlib

import numpy as np

from . import _locking
from .optimizer import Optimizer

#: Version of the checkpoint file layout written by :func:`save`.
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file that is not a readable fastopt checkpoint (truncated, damaged or foreign)."""


def _keys(opt: Optimizer) -> list[list]:
    return [[slot.index for slot in slots] for slots in opt._group_slots]


def _jsonable(value, where: str):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, where) for v in value]
    raise TypeError(f"cannot save {where} = {value!r} ({type(value).__name__}) in a checkpoint")


def _contents(opt: Optimizer) -> dict[str, np.ndarray]:
    """Every array of the checkpoint of ``opt``, ``meta`` included."""
    sd = opt.state_dict()
    keys = _keys(opt)
    slots = [slot for group in opt._group_slots for slot in group]
    arrays: dict[str, np.ndarray] = {}
    entries = []
    for i, slot in enumerate(slots):
        entry = sd["state"][slot.index]
        arrays[f"param_{i}"] = slot.param
        buffers, scalars = [], {}
        for name, value in entry.items():
            if isinstance(value, np.ndarray):
                arrays[f"state_{i}_{name}"] = value
                buffers.append(name)
            else:
                scalars[name] = _jsonable(value, f"state {name!r} of parameter {slot.index!r}")
        entries.append({"scalars": scalars, "buffers": buffers})
    groups = [{k: _jsonable(v, f"param group {gi} option {k!r}") for k, v in g.items() if k != "params"}
              for gi, g in enumerate(sd["param_groups"])]
    meta = {"fastopt_checkpoint": CHECKPOINT_VERSION, "optimizer": sd["optimizer"], "format": sd["format"],
            "step_count": sd["step_count"], "keys": keys, "param_groups": groups, "state": entries}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    return arrays


@_locking.synchronized_arg(Optimizer)  # holds the optimizer's lock throughout (fastopt._locking)
def save(opt: Optimizer, path: str | os.PathLike) -> None:
    """Write ``opt``'s parameters, state, hyper-parameters and step to ``path``, atomically.

    Parameters
    ----------
    opt : fastopt.Optimizer
        Over arrays or over a FlatParams (tensors in no param group are not saved).
    path : str or os.PathLike
        The file to write (used as given: no ``.npz`` is appended). Its directory must
        exist; the temporary file is created there so that the final rename is atomic.

    Notes
    -----
    The old file at ``path``, if any, is replaced only once the new one is completely
    written and fsynced; a crash at any point leaves one of the two whole. The new file
    gets the old one's permissions (0o644 if there was none). It holds ``opt``'s lock until
    the file is written, so a step from another thread waits and the file holds one step.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"save() takes a fastopt optimizer, got {type(opt).__name__}")
    path = os.fspath(path)
    arrays = _contents(opt)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        try:
            mode = os.stat(path).st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Make the rename durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The meta dict and every array of a checkpoint file, read whole (CRCs checked)."""
    try:
        npz = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path} is not a fastopt checkpoint (cannot read it as .npz: {exc})") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise CheckpointError(f"{path} is not a fastopt checkpoint (a single .npy array, not an .npz)")
    try:
        with npz:
            if "meta" not in npz.files:
                raise CheckpointError(f"{path} is an .npz without fastopt metadata, not a fastopt checkpoint")
            arrays = {name: npz[name] for name in npz.files}
    except CheckpointError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise CheckpointError(f"{path} is truncated or damaged: {exc}") from None
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} has unreadable fastopt metadata: {exc}") from None
    if not isinstance(meta, dict) or meta.get("fastopt_checkpoint") != CHECKPOINT_VERSION:
        version = meta.get("fastopt_checkpoint") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} is fastopt checkpoint version {version!r}; this fastopt reads version "
                              f"{CHECKPOINT_VERSION}")
    return meta, arrays


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@_locking.synchronized_arg(Optimizer)  # holds the optimizer's lock throughout (fastopt._locking)
def load(opt: Optimizer, path: str | os.PathLike) -> None:
    """Restore ``opt`` and its parameters from a checkpoint written by :func:`save`.

    Parameters
    ----------
    opt : fastopt.Optimizer
        An optimizer of the same class over parameters with the same keys (tensor names, or
        positions for a list), shapes and dtypes, in the same param groups.
    path : str or os.PathLike
        The checkpoint file.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        If the file is truncated, damaged or not a fastopt checkpoint.
    ValueError, TypeError
        If it is a checkpoint of another optimizer or model.

    In every error case, ``opt`` and its parameters are unchanged.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"load() takes a fastopt optimizer, got {type(opt).__name__}")
    path = os.fspath(path)
    meta, arrays = _read(path)
    try:
        name, keys, groups, entries = meta["optimizer"], meta["keys"], meta["param_groups"], meta["state"]
        step_count, state_format = meta["step_count"], meta["format"]
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path} has incomplete fastopt metadata (missing {exc})") from None
    if name != type(opt).__name__:
        raise ValueError(f"{path} is a checkpoint of {name}, not {type(opt).__name__}")
    ours = _keys(opt)
    if keys != ours:
        raise ValueError(f"{path} holds parameters {keys} in its param groups; this optimizer has {ours}")
    slots = [slot for group in opt._group_slots for slot in group]
    if not isinstance(entries, list) or len(entries) != len(slots) or len(groups) != len(ours):
        raise CheckpointError(f"{path} has inconsistent fastopt metadata")
    params, state = [], {}
    for i, slot in enumerate(slots):
        p = arrays.get(f"param_{i}")
        if p is None:
            raise CheckpointError(f"{path} lacks the values of parameter {slot.index!r}")
        if p.shape != slot.param.shape or p.dtype != slot.param.dtype:
            raise ValueError(f"{path}: parameter {slot.index!r} has shape {p.shape} and dtype {p.dtype}; "
                             f"this optimizer's has shape {slot.param.shape} and dtype {slot.param.dtype}")
        params.append((slot.param, p))
        entry = dict(entries[i].get("scalars", {}))
        for buffer in entries[i].get("buffers", []):
            value = arrays.get(f"state_{i}_{buffer}")
            if value is None:
                raise CheckpointError(f"{path} lacks state {buffer!r} of parameter {slot.index!r}")
            entry[buffer] = value
        state[slot.index] = entry
    sd = {"optimizer": name, "format": state_format, "step_count": step_count, "state": state,
          "param_groups": [{**{k: _tuples(v) for k, v in g.items()}, "params": list(k)}
                           for g, k in zip(groups, keys)]}
    opt.load_state_dict(sd)  # checks everything, then changes the optimizer
    for param, value in params:  # checked above: cannot fail
        np.copyto(param, value)


__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "load", "save"]
