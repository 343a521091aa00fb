"""Checkpoints: an optimizer's parameters, state, hyper-parameters and step in one ``.npz``.

:func:`save` writes a NumPy ``.npz`` (a zip of ``.npy`` arrays, no pickle) atomically: it
writes a temporary file in the target's directory, flushes and fsyncs it, renames it over
the target with :func:`os.replace` and fsyncs the directory. A process killed while saving
leaves the previous checkpoint as it was (plus, at worst, a stray ``.<name>.*.tmp`` file
beside it). A symbolic link is followed: its target is replaced, the link kept.

:func:`load` treats the file as untrusted input. Before reading any array it checks the zip
directory (its declared size bounded by the members this optimizer's checkpoint can have),
that the members are exactly the ones the metadata names (an unknown, missing, duplicated,
encrypted or other-than-stored/deflated member is refused), and the metadata itself (read
with a size bound, then every field's type and value checked against the optimizer). Each
array member is checked before its data is read: the zip entry's declared size against the
bytes the optimizer's parameter needs, then its ``.npy`` header (float dtype of the
parameter's precision, exact shape). Only then is exactly that many bytes read, with the zip
CRC verified, so a bit flip in any CRC-covered byte is caught and nothing is allocated from
a size the file declares. Nothing is ever unpickled. A byte-swapped or Fortran-order array
is converted (exactly); any other dtype is refused. Every refusal is a
:class:`CheckpointError` (a ``ValueError``): a truncated, damaged or foreign file, or a
checkpoint of another optimizer or model. Then every parameter and state buffer is checked
to be writable, and only then are the optimizer and the parameters changed, so in every
error case both are left as they were.

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
import math
import numbers
import os
import tempfile
import zipfile

import numpy as np

from . import _locking
from .optimizer import Optimizer

#: Version of the checkpoint file layout written by :func:`save`.
CHECKPOINT_VERSION = 1


class CheckpointError(ValueError):
    """A file :func:`load` refuses: truncated, damaged, tampered, not a fastopt checkpoint, or a
    checkpoint of another optimizer or model. Raised before anything is changed."""


def _keys(opt: Optimizer) -> list[list]:
    return [[slot.index for slot in slots] for slots in opt._group_slots]


def _jsonable(value, where: str):
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (tuple, list)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):  # a user key's value
        return {k: _jsonable(v, where) for k, v in value.items()}
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
        exist; the temporary file is created there so that the final rename is atomic. A
        symbolic link is followed: the file it points to is replaced, the link kept.

    Notes
    -----
    The old file at ``path``, if any, is replaced only once the new one is completely
    written and fsynced; a crash at any point leaves one of the two whole. The new file
    gets the old one's permissions (0o644 if there was none). It holds ``opt``'s lock until
    the file is written, so a step from another thread waits and the file holds one step.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"save() takes a fastopt optimizer, got {type(opt).__name__}")
    _write_atomically(os.fspath(path), _contents(opt))


def _write_atomically(path: str, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)`` through a temporary file in the target's directory that is
    written, fsynced and renamed over the target, then the directory fsynced. A symbolic link at
    ``path`` is followed: its target is replaced, the link kept."""
    _replace(*_write_temporary(path, arrays))


def _write_temporary(path: str, arrays: dict[str, np.ndarray]) -> tuple[str, str]:
    """Write and fsync ``arrays`` to a new temporary file beside ``path``'s target, with the
    target's permissions (0o644 if there is none); return it and the target."""
    path = os.path.realpath(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
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
    except BaseException:
        _discard(tmp)
        raise
    return tmp, path


def _replace(tmp: str, path: str) -> None:
    """Rename ``tmp`` over ``path`` and make the rename durable."""
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_directory(os.path.dirname(path))


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


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


# -- reading: an untrusted file, checked against what the optimizer needs -------------------

#: Most bytes a member's ``.npy`` header may take (NumPy writes 128; its own reader's limit is 10,000).
_NPY_HEADER_LIMIT = 10_000
#: Most bytes one central-directory entry may take (46 fixed, then name, extra field, comment).
_DIRECTORY_ENTRY_LIMIT = 46 + 2048
#: Bytes read from a member at a time.
_READ_CHUNK = 1 << 18
_EOCD, _ZIP64_LOCATOR, _ZIP64_EOCD = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"


def _directory_sizes(f, size: int) -> list[int]:
    """The central-directory sizes declared by every end record ``zipfile`` might use (the last
    22 bytes, the last signature in the final 64 KiB, and their ZIP64 records)."""
    tail_len = min(size, 22 + 0xFFFF)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    ends = {tail.rfind(_EOCD)} | ({tail_len - 22} if tail[-22:-18] == _EOCD else set())
    sizes = []
    for at in sorted(e for e in ends if 0 <= e <= tail_len - 22):
        sizes.append(int.from_bytes(tail[at + 12 : at + 16], "little"))
        locator = size - tail_len + at - 20
        if locator < 0:
            continue
        f.seek(locator)
        record = f.read(20)
        if record[:4] != _ZIP64_LOCATOR:
            continue
        for where in {locator - 56, int.from_bytes(record[8:16], "little")}:
            if 0 <= where <= size - 56:
                f.seek(where)
                zip64 = f.read(56)
                if zip64[:4] == _ZIP64_EOCD:
                    sizes.append(int.from_bytes(zip64[40:48], "little"))
    return sizes


class _Archive:
    """A checkpoint file opened for reading, trusted in nothing.

    Opening it checks the zip directory before ``zipfile`` parses it (its declared size is
    bounded by ``max_members`` entries) and then every entry (unique names, stored or deflated,
    not encrypted). :meth:`read` checks a member's declared size against the array the caller
    expects, then its ``.npy`` header (dtype, shape), and only then reads exactly that many bytes,
    verifying the zip CRC. Nothing is allocated from a size the file declares before it is
    checked, and no member is read that the caller does not ask for. Every failure caused by
    the file's contents raises :class:`CheckpointError`.
    """

    def __init__(self, path: str, max_members: int):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close(); OSErrors opening it propagate
        try:
            size = os.fstat(self._file.fileno()).st_size
            limit = max_members * _DIRECTORY_ENTRY_LIMIT
            declared = _directory_sizes(self._file, size)
            if not declared:
                raise CheckpointError(f"{path} is not a fastopt checkpoint (not a zip file: no end record)")
            if max(declared) > limit:
                raise CheckpointError(f"{path} declares a zip directory of {max(declared):,} bytes; a checkpoint "
                                      f"of this optimizer has at most {max_members} members ({limit:,} bytes)")
            self._file.seek(0)
            self._zip = zipfile.ZipFile(self._file)
            infos = self._zip.infolist()
            names = [info.filename for info in infos]
            if len(names) > max_members or len(set(names)) != len(names):
                raise CheckpointError(f"{path} has {len(names)} members ({len(set(names))} distinct names); a "
                                      f"checkpoint of this optimizer has at most {max_members}, each once")
            for info in infos:
                if info.flag_bits & 0x61:  # encrypted, compressed patched data, strong encryption
                    raise CheckpointError(f"{path}: member {info.filename!r} is encrypted or patched")
                if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                    raise CheckpointError(f"{path}: member {info.filename!r} uses compression method "
                                          f"{info.compress_type}, not stored or deflated")
                if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
                    raise CheckpointError(f"{path}: stored member {info.filename!r} declares {info.compress_size} "
                                          f"compressed and {info.file_size} uncompressed bytes")
            self.members = {info.filename: info for info in infos}
        except BaseException as exc:
            self._file.close()
            if isinstance(exc, (CheckpointError, MemoryError)) or not isinstance(exc, Exception):
                raise
            raise CheckpointError(f"{path} is not a fastopt checkpoint (cannot read it as .npz: "
                                  f"{type(exc).__name__}: {exc})") from exc

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def expect(self, names: set[str]) -> None:
        """Raise unless the members are exactly ``names`` (``.npy`` added)."""
        have, want = set(self.members), {f"{n}.npy" for n in names}
        if have != want:
            unknown, missing = sorted(have - want), sorted(want - have)
            raise CheckpointError(f"{self.path} is not a checkpoint of this optimizer: "
                                  + "; ".join(([f"unknown member(s) {unknown[:5]}"] if unknown else [])
                                              + ([f"missing member(s) {missing[:5]}"] if missing else [])))

    def read(self, name: str, dtype, shape: tuple[int, ...] | None = None, max_size: int = 0) -> np.ndarray:
        """Member ``name`` (no ``.npy``) as an array of ``dtype`` (native byte order; a byte-swapped
        or Fortran-order member is converted, exactly) and ``shape``; or, when ``shape`` is None,
        a 1-D array of at most ``max_size`` elements."""
        info = self.members.get(f"{name}.npy")
        if info is None:
            raise CheckpointError(f"{self.path} lacks member {name!r}")
        dtype = np.dtype(dtype)
        try:
            return self._read(info, name, dtype, shape, max_size)
        except (CheckpointError, MemoryError):
            raise
        except Exception as exc:  # noqa: BLE001 - whatever parsing the file raises, the file is bad
            raise CheckpointError(f"{self.path} is truncated or damaged (member {name!r}: "
                                  f"{type(exc).__name__}: {exc})") from exc

    def _read(self, info, name, dtype, shape, max_size) -> np.ndarray:
        where = f"{self.path}: member {name!r}"
        most = max_size if shape is None else math.prod(shape)
        if not info.file_size <= most * dtype.itemsize + _NPY_HEADER_LIMIT:
            raise CheckpointError(f"{where} declares {info.file_size:,} bytes; it should hold at most "
                                  f"{most:,} values of {dtype}")
        with self._zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                header = np.lib.format.read_array_header_1_0(f, max_header_size=_NPY_HEADER_LIMIT)
            elif version == (2, 0):
                header = np.lib.format.read_array_header_2_0(f, max_header_size=_NPY_HEADER_LIMIT)
            else:
                raise CheckpointError(f"{where} is a .npy of format version {version}, not 1.0 or 2.0")
            file_shape, fortran, file_dtype = header
            if file_dtype.fields is not None or file_dtype.subdtype is not None or (
                    file_dtype.newbyteorder("=") != dtype):
                raise CheckpointError(f"{where} holds {file_dtype} values, not {dtype}")
            if shape is None:
                if len(file_shape) != 1 or not 0 <= file_shape[0] <= max_size:
                    raise CheckpointError(f"{where} has shape {file_shape}, not (n,) with n <= {max_size}")
                shape = tuple(file_shape)
            elif tuple(file_shape) != tuple(shape):
                raise CheckpointError(f"{where} has shape {file_shape}; this optimizer's has shape {shape}")
            nbytes = math.prod(shape) * dtype.itemsize
            if info.file_size != f.tell() + nbytes:
                raise CheckpointError(f"{where} declares {info.file_size} bytes, not its header's "
                                      f"{f.tell()} plus {nbytes} of data")
            data = np.empty(nbytes, np.uint8)  # the size the optimizer needs, checked above
            view, done = memoryview(data), 0
            while done < nbytes:  # in chunks: no second copy of the data; the last read checks the CRC
                chunk = f.read(min(_READ_CHUNK, nbytes - done))
                if not chunk:
                    raise CheckpointError(f"{where} is truncated")
                view[done : done + len(chunk)] = chunk
                done += len(chunk)
            if f.read(1):
                raise CheckpointError(f"{where} holds more than its header says")
        array = data.view(file_dtype)
        array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
        if file_dtype != dtype or not array.flags.c_contiguous:
            array = np.ascontiguousarray(array, dtype=dtype)
        return array


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


#: Step counts a checkpoint may hold (what an int64 holds).
_MAX_STEP = 2**63 - 1


def _short(value) -> str:
    """``repr(value)`` cut to 200 characters (values from a file go into messages)."""
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def _is_count(value) -> bool:
    return type(value) is int and 0 <= value <= _MAX_STEP


def _buffer_names(opt: Optimizer | type[Optimizer]) -> set[str]:
    """Every state buffer any of the optimizer's (or optimizer class's) rules may keep."""
    return {name for rule in opt.kernel.RULES for name in rule.state}


def _meta_limit(n_params: int, n_groups: int) -> int:
    """Most bytes of metadata a checkpoint of this many parameters and groups may hold."""
    return (1 << 20) + 16384 * (n_params + n_groups)


def _writeable(array) -> bool:
    """Whether ``array`` and the array owning its memory can be written (a base made read-only
    after a view of it was taken leaves the view's flag set; NumPy's ``base`` skips the views
    in between)."""
    while isinstance(array, np.ndarray):
        if not array.flags.writeable:
            return False
        array = array.base
    return True


def _plan(opt: Optimizer, meta, archive: _Archive) -> tuple[dict, list]:
    """The state dict and the parameter values of a checkpoint whose metadata is ``meta``,
    read from ``archive`` after checking the metadata against ``opt`` (nothing is changed)."""
    path = archive.path
    if not isinstance(meta, dict) or type(meta.get("fastopt_checkpoint")) is not int:
        raise CheckpointError(f"{path} has no fastopt checkpoint version in its metadata")
    if meta["fastopt_checkpoint"] != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is fastopt checkpoint version {_short(meta['fastopt_checkpoint'])}; "
                              f"this fastopt reads version {CHECKPOINT_VERSION}")
    fields = {"optimizer": str, "format": int, "step_count": int, "keys": list, "param_groups": list, "state": list}
    for field, kind in fields.items():
        if type(meta.get(field)) is not kind:
            raise CheckpointError(f"{path} has malformed fastopt metadata: {field!r} is "
                                  f"{type(meta.get(field)).__name__}, not {kind.__name__}")
    name, keys, groups, entries = meta["optimizer"], meta["keys"], meta["param_groups"], meta["state"]
    if name != type(opt).__name__:
        raise CheckpointError(f"{path} is a checkpoint of {_short(name)}, not {type(opt).__name__}")
    ours = _keys(opt)
    if keys != ours:
        raise CheckpointError(f"{path} holds parameters {_short(keys)} in its param groups; this optimizer has "
                              f"{_short(ours)}")
    slots = [slot for group in opt._group_slots for slot in group]
    if len(groups) != len(ours) or not all(type(g) is dict for g in groups) or len(entries) != len(slots):
        raise CheckpointError(f"{path} has metadata for {len(groups)} param groups and {len(entries)} parameters; "
                              f"this optimizer has {len(ours)} and {len(slots)}")
    if not _is_count(meta["step_count"]):
        raise CheckpointError(f"{path}: step_count {_short(meta['step_count'])} is not in [0, 2**63)")
    known = _buffer_names(opt)
    members, state, params = {"meta"}, {}, []
    for i, (slot, entry) in enumerate(zip(slots, entries)):
        where = f"{path}: parameter {slot.index!r}"
        if type(entry) is not dict or type(entry.get("scalars")) is not dict or type(entry.get("buffers")) is not list:
            raise CheckpointError(f"{where} has malformed metadata (scalars and buffers)")
        scalars, buffers = entry["scalars"], entry["buffers"]
        if not all(type(v) in (bool, int, float) for v in scalars.values()) or not _is_count(scalars.get("step")):
            raise CheckpointError(f"{where}: its scalars {_short(scalars)} are not numbers with a step in [0, 2**63)")
        if not all(type(b) is str and b in known for b in buffers) or len(set(buffers)) != len(buffers) or (
                set(buffers) & set(scalars)):
            raise CheckpointError(f"{where} lists state buffers {_short(buffers)}; {type(opt).__name__} keeps at most "
                                  f"{sorted(known)}, each once")
        members.add(f"param_{i}")
        members.update(f"state_{i}_{b}" for b in buffers)
        state[slot.index] = dict(scalars)
    archive.expect(members)  # before reading any array: no unknown member is read
    for i, (slot, entry) in enumerate(zip(slots, entries)):
        params.append((slot.param, archive.read(f"param_{i}", slot.dtype, tuple(slot.shape))))
        for b in entry["buffers"]:
            state[slot.index][b] = archive.read(f"state_{i}_{b}", slot.dtype, tuple(slot.shape))
    sd = {"optimizer": name, "format": meta["format"], "step_count": meta["step_count"], "state": state,
          "param_groups": [{**{k: _tuples(v) for k, v in g.items()}, "params": list(k)}
                           for g, k in zip(groups, ours)]}
    return sd, params


@_locking.synchronized_arg(Optimizer)  # holds the optimizer's lock throughout (fastopt._locking)
def load(opt: Optimizer, path: str | os.PathLike) -> None:
    """Restore ``opt`` and its parameters from a checkpoint written by :func:`save`.

    Parameters
    ----------
    opt : fastopt.Optimizer
        An optimizer of the same class over parameters with the same keys (tensor names, or
        positions for a list), shapes and dtypes, in the same param groups.
    path : str or os.PathLike
        The checkpoint file. It is not trusted: see the module documentation for what is
        checked, and in what order, before anything is read or changed.

    Raises
    ------
    FileNotFoundError, OSError
        If ``path`` cannot be opened.
    CheckpointError
        (a ``ValueError``) If the file is truncated, damaged, not a fastopt checkpoint, or a
        checkpoint of another optimizer, model or layout.
    ValueError
        If a parameter or state buffer of ``opt`` cannot be written (made read-only).

    In every error case, ``opt`` and its parameters are unchanged.
    """
    if not isinstance(opt, Optimizer):
        raise TypeError(f"load() takes a fastopt optimizer, got {type(opt).__name__}")
    path = os.fspath(path)
    slots = [slot for group in opt._group_slots for slot in group]
    max_members = 1 + len(slots) * (1 + len(_buffer_names(opt)))
    with _Archive(path, max_members) as archive:
        meta_bytes = archive.read("meta", np.uint8, max_size=_meta_limit(len(slots), len(opt._group_slots)))
        try:
            meta = json.loads(meta_bytes.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path} has unreadable fastopt metadata: {exc}") from None
        sd, params = _plan(opt, meta, archive)
    flat = [opt._flat.flat.buffer] if opt._flat is not None else []  # its views' flags do not follow it
    if not all(_writeable(p) for p in [*flat, *(param for param, _ in params)]):
        raise ValueError("load() cannot write a parameter of this optimizer: it (or the array it views) "
                         "was made read-only")
    for entry in opt.state.values() if isinstance(opt.state, dict) else opt.state:
        if not all(_writeable(v) for v in entry.values() if isinstance(v, np.ndarray)):
            raise ValueError("load() cannot write a state buffer of this optimizer: it was made read-only")
    try:
        opt.load_state_dict(sd)  # checks everything, then changes the optimizer (or raises, changing nothing)
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise CheckpointError(f"{path} does not fit this optimizer: {exc}") from None
    for param, value in params:  # checked above (shapes, dtypes, writeable): cannot fail
        np.copyto(param, value)


__all__ = ["CHECKPOINT_VERSION", "CheckpointError", "load", "save"]
