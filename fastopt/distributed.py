r"""Data-parallel training over MPI with ZeRO stage 1: optimizer state sharded across ranks.

Every rank holds the whole model (one :class:`~fastopt.FlatParams`) and computes gradients on
its own part of the batch. :class:`ShardedOptimizer` then does what DeepSpeed's ZeRO stage 1
does, on an existing MPI (mpi4py; ``pip install 'fastopt[mpi]'``):

1. the flat buffer of :math:`N` elements is cut into one contiguous shard per rank. With
   :math:`W` ranks and an alignment of :math:`A` elements the shard length is
   :math:`S = A\,\lceil N / (W A) \rceil` (the buffer padded to a multiple of :math:`W A`):
   rank :math:`r` owns :math:`[rS, \min((r+1)S, N))`, so the last shard may be shorter, or
   empty on a tiny model; the collectives use per-rank counts;
2. ``step(local_grads)`` reduce-scatters the gradients, so that rank :math:`r` receives the
   sum over ranks of its shard; the average :math:`\bar g = \frac1W \sum_{k} g^{(k)}` costs
   no extra pass: :math:`1/W` (times the clip factor) is the kernel's gradient scale;
3. an ordinary fastopt optimizer over rank :math:`r`'s shard (a ``FlatParams`` view of that
   slice of the parameter buffer, with the same param groups) updates it in place with one
   fused launch: each rank allocates optimizer state for :math:`S` elements, not :math:`N`;
4. an in-place ``Allgatherv`` copies every rank's updated shard into every rank's buffer.

Per step each rank sends and receives about :math:`2N` elements (reduce-scatter plus
all-gather: the traffic of one all-reduce) and keeps :math:`1/W` of the optimizer state.

Transforms work across ranks: ``clip_grad_norm`` clips by the global norm
:math:`\|\bar g\| = (\sum_r \|\bar g_r\|^2)^{1/2}` (an ``Allreduce`` of the shards' squared
norms), and ``skip_nonfinite`` skips the step on every rank when any rank's shard holds NaN or
inf (the same ``Allreduce`` carries the count). Schedules (``lr`` callables) see the step count
as usual. ``grad_noise`` is not supported here.

Results match a single process that steps on the averaged gradient: bit for bit with two ranks
(:math:`(g^{(0)} + g^{(1)}) \cdot \frac12` rounds once, in any order, and halving is exact),
and within rounding with more, where MPI may add the ranks' gradients in another order and
:math:`\cdot \frac1W` rounds differently from :math:`/W`. With ``clip_grad_norm`` the global
norm is summed in another order too, so the clip factor may differ in its last bit.

Example, launched with ``mpiexec -n 2 python train.py``::

    from mpi4py import MPI
    import fastopt as fo
    from fastopt.distributed import ShardedOptimizer

    flat = fo.FlatParams({"w": (784, 256), "b": 256})      # same initial values on every rank
    grads = flat.zeros_like()
    opt = ShardedOptimizer(fo.Adam, flat, MPI.COMM_WORLD, lr=1e-3, clip_grad_norm=1.0)
    for xb, yb in my_part_of_the_batches:
        compute_grads(flat, xb, yb, out=grads)            # local gradients
        opt.step(grads)                                   # average, update shard, all-gather

Errors reach every rank. Each collective method (construction, ``step``, loading, gathering,
and :mod:`fastopt.distributed_checkpoint`'s saving) runs all of its checks locally, then the
ranks :func:`agree` (one small ``Allreduce``) before the first data collective: if any rank's
check failed, or the ranks' hyper-parameters, step counts or transforms differ, every rank
raises the same exception type with the same message naming the failing rank, and nothing
has changed anywhere. No check that fails on one rank leaves the others blocked in a
collective. For exceptions in your own code, :func:`abort_on_exception` makes an uncaught one
end the whole job.

``import fastopt`` never imports mpi4py; this module imports it when an optimizer is built.
"""

from __future__ import annotations

import hashlib
import math
import numbers
import pickle
import sys
import time
import traceback
import zlib
from typing import Any

import numpy as np

from ._validation import check_array_type
from .flat import FlatLayout, FlatParams, FlatSelection, aligned_zeros, host_gradient_buffer
from .kernels import reduce
from .optimizer import Optimizer, _checked_plan
from .transforms import GradTransforms, clip_coefficient

__all__ = ["ShardedOptimizer", "abort_on_exception", "agree", "shard_bounds"]


def _mpi():
    if "mpi4py.MPI" in sys.modules:  # the common case, without the import machinery
        return sys.modules["mpi4py.MPI"]
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastopt.distributed needs mpi4py and an MPI library: pip install 'fastopt[mpi]' "
                          "(mpi4py with the mpich wheel), or mpi4py built against your system MPI") from exc
    return MPI


# -- agreement: one rank's failure reaches every rank ---------------------------------------
#: Reduced with MAX: a slot a rank does not take part in (no shard to update) holds this.
_ABSENT = np.iinfo(np.int64).min
_DIGEST_MASK = (1 << 62) - 1  # so that -digest never overflows


def _canon(value):
    """A value as the ranks compare it (by its ``repr``): numbers as Python floats, whose repr is
    exact (1 and 1.0 alike), tuples and lists alike, a schedule as ``"<schedule>"`` (its values
    are compared at each step), and any other object by its type (a repr holding an address
    would differ on every rank)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Real):
        try:
            return float(value)
        except (OverflowError, ValueError):
            return repr(value)
    if isinstance(value, (tuple, list)):
        return tuple(_canon(v) for v in value)
    if value is None or isinstance(value, str):
        return value
    if callable(value):
        return "<schedule>"
    return f"<{type(value).__qualname__}>"


def _digest(description: dict) -> int:
    """A 62-bit digest of a dict of canonical values, deterministic across processes (unlike
    ``hash`` of a string): BLAKE2b of the repr of its sorted items. Memoized on the items, so
    that a step whose hyper-parameters did not change costs one dict lookup."""
    key = tuple(description.items())
    try:
        return _DIGESTS[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable value: no memo
        key = None
    raw = hashlib.blake2b(repr(tuple(sorted(description.items()))).encode(), digest_size=8).digest()
    digest = int.from_bytes(raw, "little") & _DIGEST_MASK
    if key is not None:
        if len(_DIGESTS) >= 256:  # a schedule gives a new lr every step: keep the memo small
            _DIGESTS.clear()
        _DIGESTS[key] = digest
    return digest


_DIGESTS: dict[tuple, int] = {}


def _portable(exc: BaseException) -> type:
    """The exception class the other ranks will raise: ``type(exc)`` if it pickles and takes a
    message, else RuntimeError."""
    cls = type(exc)
    try:
        pickle.loads(pickle.dumps(cls))
        cls("probe")
    except Exception:  # noqa: BLE001 - any class the other ranks cannot rebuild
        return RuntimeError
    return cls


def agree(comm, what: str, error: BaseException | None = None, descriptions=(), labels=None) -> None:
    """Collective: every rank of ``comm`` learns whether any rank failed a check and whether the
    ranks hold the same ``descriptions``; then every rank returns, or every rank raises.

    ``error`` is this rank's failure (None if its checks passed). ``descriptions`` is a
    sequence of dicts ``{name: canonical value}`` the ranks must agree on, or None where this
    rank takes no part (a rank whose shard holds no tensor has no param groups). The common
    path is one ``Allreduce`` (MAX) of ``1 + 2 * len(descriptions)`` int64: a failure flag,
    and for each description its digest and its negation (equal maxima of both mean every
    rank has the same digest). Only when something differs do the ranks ``allgather`` what
    they need for the message.

    Raises on every rank: the exception type of the lowest failing rank, with one message
    naming the failing ranks, chained to the original on the rank that raised it and with
    ``failed_ranks`` set; or, if no rank failed but descriptions differ, ``ValueError``
    naming the ranks and the entries that differ from the lowest rank's.
    """
    local = _votes(error, descriptions)
    total = np.empty_like(local)
    comm.Allreduce(local, total, op=_mpi().MAX)
    _settle(comm, what, error, descriptions, labels, total)


def _votes(error, descriptions) -> np.ndarray:
    """This rank's side of :func:`agree`: the failure flag, then each digest and its negation."""
    local = np.full(1 + 2 * len(descriptions), _ABSENT, np.int64)
    local[0] = 0 if error is None else 1
    for i, d in enumerate(descriptions):
        if d is not None:
            h = _digest(d)
            local[1 + 2 * i], local[2 + 2 * i] = h, -h
    return local


def _settle(comm, what, error, descriptions, labels, total: np.ndarray) -> None:
    """Return if the reduced votes say every rank passed and agrees, else raise on every rank."""
    n = len(descriptions)
    if total[0] == 0 and all(total[1 + 2 * i] == -total[2 + 2 * i] or total[1 + 2 * i] == _ABSENT
                             for i in range(n)):
        return
    world = comm.Get_size()
    mine = None if error is None else (_portable(error), str(error))
    infos = comm.allgather((mine, list(descriptions)))
    failed = [r for r, (e, _) in enumerate(infos) if e is not None]
    if failed:
        cls, message = infos[failed[0]][0]
        where = f"rank {failed[0]}" if len(failed) == 1 else f"ranks {failed}"
        text = f"{what} failed on {where} of {world}: {message}"
        if len(failed) > 1 and len({e[1] for e, _ in (infos[r] for r in failed)}) > 1:
            text += f" (the message of rank {failed[0]})"
        try:
            new = cls(text)
        except Exception:  # noqa: BLE001 - _portable checked it; a constructor may still refuse this text
            new = RuntimeError(text)
        new.failed_ranks = failed
        raise new from error
    problems, ranks = [], set()
    for i in range(n):
        present = [(r, d[i]) for r, (_, d) in enumerate(infos) if d[i] is not None]
        if not present:
            continue
        r0, ref = present[0]
        bad = [(r, d) for r, d in present if repr(sorted(d.items())) != repr(sorted(ref.items()))]
        if not bad:
            continue
        ranks.update(r for r, _ in bad)
        differing = sorted({k for _, d in bad for k in set(d) | set(ref) if repr(d.get(k)) != repr(ref.get(k))})
        shown = [f"{k} = {bad[0][1].get(k)!r} on rank {bad[0][0]}, {ref.get(k)!r} on rank {r0}"
                 for k in differing[:4]]
        label = labels[i] if labels else "settings"
        problems.append(f"ranks {[r for r, _ in bad]} differ from rank {r0} in their {label}: " + "; ".join(shown)
                        + ("; ..." if len(differing) > 4 else ""))
    exc = ValueError(f"{what}: " + " | ".join(problems))
    exc.failed_ranks = sorted(ranks)
    raise exc


def abort_on_exception(comm=None, errorcode: int = 1):
    """Make an uncaught exception on any rank end the whole MPI job.

    Installs a :data:`sys.excepthook` that prints the traceback as usual, then calls
    ``comm.Abort(errorcode)`` (``MPI.COMM_WORLD`` by default), which ends every rank of the
    job. Without it, a rank that dies of an exception outside fastopt leaves the others
    waiting in their next collective, and the job does not end (seen with MPICH). Returns
    the hook it replaced. ``python -m mpi4py train.py`` does the same for a whole script.
    Only the main thread's uncaught exceptions reach :data:`sys.excepthook`.
    """
    MPI = _mpi()
    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm must be an mpi4py communicator, got {comm!r}")
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        try:
            previous(exc_type, exc, tb)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            comm.Abort(errorcode)

    sys.excepthook = hook
    return previous


def shard_bounds(size: int, world_size: int, align_elems: int) -> list[tuple[int, int]]:
    r"""The ``[lo, hi)`` element range of every rank's shard of a buffer of ``size`` elements.

    Shards have :math:`S = A \lceil N / (W A) \rceil` elements (``A = align_elems``), the last
    ones clipped to the buffer: ``[(min(r S, N), min((r+1) S, N)) for r in range(W)]``.
    """
    if world_size < 1 or align_elems < 1:
        raise ValueError("world_size and align_elems must be >= 1")
    per = align_elems * -(-size // (world_size * align_elems))
    return [(min(r * per, size), min((r + 1) * per, size)) for r in range(world_size)]


def _shard_layout(layout: FlatLayout, lo: int, hi: int) -> tuple[FlatLayout, dict[str, int]]:
    """The layout of the slice ``[lo, hi)`` of a buffer with ``layout``: one 1-D tensor per piece
    of a tensor that overlaps it (same name), and where each piece starts inside its tensor."""
    names, shapes, offsets, starts = [], [], [], {}
    for name, off, size in zip(layout.names, layout.offsets, layout.sizes):
        a, b = max(off, lo), min(off + size, hi)
        if a < b:
            names.append(name)
            shapes.append((b - a,))
            offsets.append(a - lo)
            starts[name] = a - off
    return FlatLayout(tuple(names), tuple(shapes), tuple(offsets), hi - lo, layout.dtype, layout.align), starts


class _AgreedScale:
    """Stands in for the shard optimizer's transforms: the clip factor every rank agreed on."""

    __slots__ = ("active", "scale")
    extra_columns = 0

    def __init__(self):
        self.scale = 1.0
        self.active = False

    def begin_step(self, opt, grads):
        return self.scale, None


class ShardedOptimizer:
    """A fastopt optimizer whose state is sharded across the ranks of an MPI communicator
    (ZeRO stage 1); see the module documentation for the algorithm.

    Parameters
    ----------
    optimizer_cls : type
        A fastopt optimizer class (``fo.Adam``, ``fo.SGD``, ...).
    params : FlatParams or list of group dicts
        The model: a :class:`~fastopt.FlatParams`, or group dicts whose ``params`` are
        selections of one (``flat.select("*.bias")``), exactly as for ``optimizer_cls``.
        Every rank must pass the same layout, groups, options and transforms (checked: a
        mismatch, or an argument that fails a check on one rank only, raises on every rank);
        the parameters are broadcast from rank 0, so every rank starts from rank 0's values,
        as in torch's DistributedDataParallel.
    comm : mpi4py.MPI.Comm
        The intra-communicator whose ranks train together (``MPI.COMM_WORLD``).
    align : int, optional
        Shard boundaries fall on multiples of ``align`` bytes; a multiple of the FlatParams'
        alignment (the default, 64 bytes), so every piece of a tensor in a shard stays aligned.
    clip_grad_norm, skip_nonfinite :
        As for every fastopt optimizer, over the global averaged gradient.
    **options
        The optimizer's hyper-parameters (``lr`` may be a schedule).

    Attributes
    ----------
    flat : FlatParams, the replicated parameters
    comm : the communicator; ``rank`` and ``world_size`` its rank and size
    bounds : list of (lo, hi), every rank's shard of ``flat.buffer``
    shard : FlatParams or None, this rank's slice of the parameters (pieces of tensors, 1-D)
    optimizer : Optimizer or None, the fastopt optimizer over ``shard`` (None when this rank's
        shard holds no tensor of any group)
    timings : dict, cumulative seconds of the steps' phases: ``"reduce_scatter"`` (with the
        checks and the ranks' vote, see :meth:`step`), ``"norm"`` (zeroing
        padding; for clipping or skipping, the local norm and its ``Allreduce``), ``"update"``
        (the fused kernel), ``"allgather"``; and the number of ``"steps"``
    """

    def __init__(self, optimizer_cls: type[Optimizer], params, comm, *, align: int | None = None,
                 clip_grad_norm: float | None = None, skip_nonfinite: bool = False, **options: Any):
        MPI = _mpi()
        if not isinstance(comm, MPI.Comm) or comm.Is_inter():  # no communicator: nobody to tell
            raise TypeError(f"comm must be an mpi4py intra-communicator (MPI.COMM_WORLD), got {comm!r}")
        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        # Every check runs on this rank first; the ranks then agree (one Allreduce) before the
        # first data collective, so a failure on one rank raises on all of them.
        error, model, settings = None, None, None
        try:
            model, settings = self._build(optimizer_cls, params, align, clip_grad_norm, skip_nonfinite, options)
        except Exception as exc:  # noqa: BLE001 - reaches every rank through agree(), then raised
            error = exc
        agree(comm, "ShardedOptimizer()", error, [model, settings],
              ["model, param groups, alignment or optimizer (tensor names, shapes, dtype and groups must "
               "be the same on every rank)", "options"])
        comm.Bcast(self.flat.buffer, root=0)

    def _build(self, optimizer_cls, params, align, clip_grad_norm, skip_nonfinite, options):
        """Check the arguments and build this rank's shard optimizer, with no communication.
        Returns the descriptions the ranks must agree on: the model and the options."""
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
            raise TypeError(f"optimizer_cls must be a fastopt optimizer class (fo.Adam, ...), got {optimizer_cls!r}")
        if options.get("grad_noise") is not None:
            raise NotImplementedError("grad_noise is not supported by ShardedOptimizer")
        options.pop("grad_noise", None)
        options.pop("seed", None)
        checked = GradTransforms(clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, seed=0)
        self._clip_grad_norm = checked.clip_grad_norm
        self._skip_nonfinite = checked.skip_nonfinite
        flat, groups = self._parse(params)
        layout = flat.layout
        if not flat.buffer.flags.writeable:  # the broadcast and every step write it
            raise ValueError("the parameters' buffer is read-only; ShardedOptimizer updates it in place")
        if align is None:
            align = layout.align
        if isinstance(align, bool) or not isinstance(align, int) or align < layout.align or align % layout.align:
            raise ValueError(f"align must be a multiple of the FlatParams' alignment ({layout.align} bytes), "
                             f"got {align!r}")
        model = {"names": layout.names, "shapes": layout.shapes, "dtype": str(layout.dtype), "size": layout.size,
                 "align": align, "groups": tuple(sel.names for sel, _ in groups),
                 "optimizer": optimizer_cls.__name__}
        self.flat = flat
        self.optimizer_cls = optimizer_cls
        self.align = align
        self.bounds = shard_bounds(layout.size, self.world_size, align // layout.dtype.itemsize)
        self._counts = np.array([hi - lo for lo, hi in self.bounds], dtype=np.int64)
        self._displs = np.array([lo for lo, _ in self.bounds], dtype=np.int64)
        self._mpi_type = self.MPI.FLOAT if layout.dtype == np.float32 else self.MPI.DOUBLE
        lo, hi = self.bounds[self.rank]
        self.lo, self.hi = lo, hi
        shard_layout, self._piece_start = _shard_layout(layout, lo, hi)
        self.shard: FlatParams | None = None
        self.optimizer: Optimizer | None = None
        self._grad = aligned_zeros(hi - lo, layout.dtype, layout.align)  # the summed gradient shard
        self._grad_flat = FlatParams.from_layout(shard_layout, self._grad) if shard_layout.names else None
        self._groups = groups
        if shard_layout.names:
            self.shard = FlatParams.from_layout(shard_layout, flat.buffer[lo:hi])
            inner = []
            for selection, overrides in groups:
                names = tuple(n for n in selection.names if n in self._piece_start)
                inner.append({"params": FlatSelection(self.shard, names), **overrides})
            if any(len(g["params"]) for g in inner):
                self.optimizer = optimizer_cls(inner, **options)
                self._selections = [g["params"] for g in self.optimizer.param_groups]
        built = self.optimizer
        if built is None:  # nothing to update here; still check the options (and fill in the defaults)
            probe = FlatParams({f"g{i}": 1 for i in range(len(groups))}, layout.dtype)
            built = optimizer_cls([{"params": probe.select(f"g{i}"), **overrides}
                                   for i, (_, overrides) in enumerate(groups)], **options)
        settings = {"clip_grad_norm": _canon(self._clip_grad_norm), "skip_nonfinite": self._skip_nonfinite}
        for gi, g in enumerate(built.param_groups):
            settings.update({f"param group {gi} {k}": _canon(v) for k, v in g.items() if k != "params"})
        self._agreed = _AgreedScale()
        if self.optimizer is not None:
            self.optimizer.transforms = self._agreed
            engine = self.optimizer._flat
            self._norm_ranges = engine._covered
            self._pad_index = engine._pad_index
        else:
            self._norm_ranges, self._pad_index = [], np.zeros(0, np.int64)
        self._step_count = 0
        self.last_grad_norm: float | None = None
        self.last_step_skipped = False
        self.skipped_steps = 0
        self.timings = {"reduce_scatter": 0.0, "norm": 0.0, "update": 0.0, "allgather": 0.0,
                        "steps": 0}
        return model, settings

    @property
    def clip_grad_norm(self) -> float | None:
        """The largest global gradient norm (None: no clipping); settable, checked, on every rank alike."""
        return self._clip_grad_norm

    @clip_grad_norm.setter
    def clip_grad_norm(self, value) -> None:
        self._clip_grad_norm = GradTransforms(clip_grad_norm=value, seed=0).clip_grad_norm

    @property
    def skip_nonfinite(self) -> bool:
        """Whether a step with NaN or inf in any rank's gradient is skipped; settable, on every rank alike."""
        return self._skip_nonfinite

    @skip_nonfinite.setter
    def skip_nonfinite(self, value) -> None:
        self._skip_nonfinite = GradTransforms(skip_nonfinite=value, seed=0).skip_nonfinite

    @staticmethod
    def _parse(params) -> tuple[FlatParams, list[tuple[FlatSelection, dict]]]:
        if isinstance(params, FlatParams):
            return params, [(FlatSelection(params, params.names), {})]
        if isinstance(params, FlatSelection):
            return params.flat, [(params, {})]
        if isinstance(params, (list, tuple)) and params and all(isinstance(g, dict) for g in params):
            groups = []
            for gi, g in enumerate(params):
                sel = g.get("params")
                if isinstance(sel, FlatParams):
                    sel = FlatSelection(sel, sel.names)
                if not isinstance(sel, FlatSelection):
                    raise TypeError(f"param group {gi}: params must be a FlatParams or a selection of one "
                                    f"(flat.select(...)), got {type(sel).__name__}")
                groups.append((sel, {k: v for k, v in g.items() if k != "params"}))
            flats = {id(sel.flat) for sel, _ in groups}
            if len(flats) > 1:
                raise ValueError("param groups select tensors of different FlatParams; shard one FlatParams")
            return groups[0][0].flat, groups
        raise TypeError("ShardedOptimizer takes a FlatParams, or group dicts whose params are selections of one, "
                        f"got {type(params).__name__}")

    # -- the step -----------------------------------------------------------------------
    def _check_grads(self, grads) -> np.ndarray:
        return host_gradient_buffer(grads, self.flat.layout, self.flat.buffer, "ShardedOptimizer.step()")

    def _prepare(self, local_grads) -> tuple[np.ndarray, dict, dict | None]:
        """Every check of a step, on this rank, before any communication: the gradient, each
        group's hyper-parameters (a schedule evaluated, an edit re-validated) and the update's
        plan. Returns the gradient buffer and what the ranks must agree on: the step count and
        transforms, and (where this rank updates a shard) every group's hyper-parameters."""
        g = self._check_grads(local_grads)
        if not self.flat.buffer.flags.writeable:  # the all-gather writes every rank's buffer
            raise ValueError("the parameters' buffer is read-only; ShardedOptimizer updates it in place")
        common = {"step_count": self._step_count, "clip_grad_norm": self._clip_grad_norm,
                  "skip_nonfinite": self._skip_nonfinite}
        opt = self.optimizer
        if opt is None:
            return g, common, None
        kernel = opt.kernel
        param_groups = opt.param_groups
        if len(param_groups) != len(self._selections):
            raise ValueError(f"ShardedOptimizer has {len(self._selections)} param groups, not "
                             f"{len(param_groups)}: groups cannot be added or removed")
        for gi, (group, selection) in enumerate(zip(param_groups, self._selections)):
            if not isinstance(group, dict) or group.get("params") is not selection:
                raise ValueError(f"param group {gi}'s params were replaced; a ShardedOptimizer's groups keep "
                                 "the tensors they were built with")
        hps = opt._hypers()  # validated, the schedule evaluated (the optimizer's own step checks again)
        hyper = {}
        for gi, hp in enumerate(hps):
            hyper.update({f"param group {gi} {k}": hp[k] for k in kernel.CHECKS})
        dtype = self.flat.dtype
        for cohort in opt._flat.cohorts:  # the plan the update will use (it raises on bad loaded state)
            _checked_plan(kernel.plan, hps[cohort.group], cohort.step + 1, dict(cohort.host), dtype, cohort.group)
        return g, common, hyper

    def step(self, local_grads) -> None:
        """Average the ranks' gradients, update this rank's shard, all-gather the parameters.

        Collective: every rank of ``comm`` must call it. ``local_grads`` is this rank's
        gradient, a ``FlatParams`` with the parameters' layout or its buffer (not modified).
        Padding between tensors is ignored. With ``skip_nonfinite``, a step in which any
        rank's gradient holds NaN or inf changes nothing on any rank.

        Before any communication every rank checks its gradient, its parameters' buffer and
        its param groups (an edit, a schedule's value, the update's plan); its vote (one
        non-blocking ``Allreduce`` of 5 int64: failed or not, digests of the step count,
        transforms and hyper-parameters) is posted before the reduce-scatter and settled
        right after it, before anything but a scratch buffer has been written. If any rank's
        check failed, or the ranks' hyper-parameters, step counts or transforms differ, every
        rank raises (the failing rank's exception type, one message naming it; see
        :func:`agree`) and nothing has changed on any rank. A failure after that point
        cannot be told to the other ranks (only a MemoryError or a bug could cause one):
        that rank prints the traceback and calls ``comm.Abort``, ending the job rather than
        leaving it hanging.
        """
        t0 = time.perf_counter()
        error, g, common, groups = None, None, None, None
        try:
            g, common, groups = self._prepare(local_grads)
        except Exception as exc:  # noqa: BLE001 - reaches every rank through the vote, then raised
            error = exc
        # The vote (a non-blocking Allreduce) is posted before the reduce-scatter and settled
        # right after it, before anything but the scratch shard self._grad has been written:
        # one synchronization per step instead of two. A rank whose checks failed sends its
        # parameter buffer (the right size and type; the result is discarded).
        descriptions = [common, groups]
        votes = _votes(error, descriptions)
        total = np.empty_like(votes)
        request = self.comm.Iallreduce(votes, total, op=self.MPI.MAX)
        try:
            send = self.flat.buffer if g is None else g
            self.comm.Reduce_scatter(send, [self._grad, self._mpi_type], recvcounts=self._counts,
                                     op=self.MPI.SUM)
        finally:
            request.Wait()
        t1 = time.perf_counter()
        _settle(self.comm, "ShardedOptimizer.step()", error, descriptions,
                ["step count or transforms", "hyper-parameters"], total)
        try:
            self._step_agreed(t1)
        except Exception:  # noqa: BLE001 - the ranks can no longer be kept in step
            self._abort("ShardedOptimizer.step() failed on rank {} after the ranks agreed to step")
        self.timings["reduce_scatter"] += t1 - t0

    def _abort(self, message: str) -> None:
        traceback.print_exc()
        print(message.format(self.rank) + "; aborting the job (comm.Abort) rather than leaving the other ranks "
              "waiting", file=sys.stderr, flush=True)
        self.comm.Abort(1)

    def _step_agreed(self, t1: float) -> None:
        """The rest of a step every rank has agreed to: the update of the reduce-scattered
        gradient shard and the all-gather."""
        MPI = self.MPI
        gs = self._grad  # the SUM of the ranks' gradients: 1/W goes into the kernel's gradient scale
        if self._pad_index.size:
            gs[self._pad_index] = 0
        inv_world = 1.0 / self.world_size
        scale = inv_world
        if self._clip_grad_norm is not None or self._skip_nonfinite:
            local = np.zeros(2, np.float64)
            for a, b in self._norm_ranges:
                s, finite = reduce.sumsq(gs[a:b])
                local[0] += s
                local[1] += 0.0 if finite else 1.0
            total = np.empty(2, np.float64)
            self.comm.Allreduce(local, total, op=MPI.SUM)
            norm = math.sqrt(total[0]) * inv_world  # the norm of the averaged gradient
            self.last_grad_norm = norm
            if self._skip_nonfinite and total[1] > 0:
                self.skipped_steps += 1
                self.last_step_skipped = True
                self.timings["norm"] += time.perf_counter() - t1
                return
            if self._clip_grad_norm is not None:
                scale = inv_world * clip_coefficient(norm, self._clip_grad_norm)
        self.last_step_skipped = False
        t2 = time.perf_counter()
        if self.optimizer is not None:
            self._agreed.scale = scale
            self._agreed.active = scale != 1.0
            self.optimizer.step(self._grad_flat)
        t3 = time.perf_counter()
        self.comm.Allgatherv(MPI.IN_PLACE, [self.flat.buffer, self._counts, self._displs, self._mpi_type])
        t4 = time.perf_counter()
        self._step_count += 1
        tm = self.timings
        tm["norm"] += t2 - t1
        tm["update"] += t3 - t2
        tm["allgather"] += t4 - t3
        tm["steps"] += 1

    @property
    def step_count(self) -> int:
        """Completed (not skipped) steps: what an ``lr`` schedule is called with."""
        return self._step_count

    @property
    def param_groups(self) -> list[dict]:
        """This rank's param groups (their ``params`` are pieces of this rank's shard); edit a
        hyper-parameter on every rank alike (``opt.param_groups[0]["lr"] = 1e-4``)."""
        if self.optimizer is None:
            return []
        return self.optimizer.param_groups

    # -- memory -------------------------------------------------------------------------
    @property
    def state_nbytes(self) -> int:
        """Bytes of optimizer state (moment buffers) held by this rank."""
        if self.optimizer is None:
            return 0
        return sum(b.nbytes for b in self.optimizer._flat.buffers.values())

    # -- state --------------------------------------------------------------------------
    def consolidated_state_dict(self, root: int | None = 0) -> dict | None:
        """The whole optimizer state, gathered: a state dict of a plain, unsharded
        ``optimizer_cls`` over the same ``FlatParams`` (keyed by tensor name, buffers of the
        tensors' shapes), so it loads into one with any world size, or into one process.

        Collective. Returned on ``root`` (None elsewhere), or on every rank if ``root`` is None.
        """
        error, pieces = None, None
        try:
            if root is not None and (isinstance(root, bool) or not isinstance(root, numbers.Integral)
                                     or not 0 <= root < self.world_size):
                raise ValueError(f"root must be None or a rank in [0, {self.world_size}), got {root!r}")
            if self.optimizer is not None:
                sd = self.optimizer.state_dict()
                header = {k: sd[k] for k in ("optimizer", "format", "param_groups")}
                pieces = (header, {name: {"start": self._piece_start[name], **entry}
                                   for name, entry in sd["state"].items()})
            else:
                pieces = (None, {})
        except Exception as exc:  # noqa: BLE001 - reaches every rank through agree(), then raised
            error = exc
        agree(self.comm, "ShardedOptimizer.consolidated_state_dict()", error, [{"root": _canon(root)}], ["root"])
        gathered = self.comm.allgather(pieces) if root is None else self.comm.gather(pieces, root=int(root))
        if gathered is None:
            return None
        layout = self.flat.layout
        sd = next((header for header, _ in gathered if header is not None), None)
        if sd is None:  # the same on every rank that gathered
            raise ValueError("no rank's shard holds a tensor of a param group: there is no state to gather")
        state: dict[str, dict] = {}
        for _, rank_pieces in gathered:
            for name, entry in rank_pieces.items():
                shape = layout.shapes[layout.index(name)]
                size = layout.sizes[layout.index(name)]
                full = state.setdefault(name, {})
                start = entry["start"]
                for k, v in entry.items():
                    if k == "start":
                        continue
                    if isinstance(v, np.ndarray):
                        if k not in full:
                            full[k] = np.zeros(size, v.dtype)
                        full[k][start : start + v.size] = v
                    else:
                        full[k] = v
                full.setdefault("_shape", shape)
        for entry in state.values():
            shape = entry.pop("_shape")
            for k, v in entry.items():
                if isinstance(v, np.ndarray):
                    entry[k] = v.reshape(shape)
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(sel.names)}
                  for g, (sel, _) in zip(sd["param_groups"], self._groups)]
        order = [n for sel, _ in self._groups for n in sel.names]
        return {"optimizer": sd["optimizer"], "format": sd["format"], "step_count": self._step_count,
                "param_groups": groups, "state": {n: state[n] for n in order}}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a whole (consolidated) state dict, saved with any number of ranks or by a plain
        optimizer over the same ``FlatParams``: each rank keeps its shard of it.

        Collective: pass the same dict on every rank. Every rank checks the dict's structure
        (every tensor's entry and shapes) and its own part (via the shard optimizer's own
        checks), and the ranks agree, also on the step count and hyper-parameters, before any
        of them changes anything: a bad dict on any rank raises on every rank and leaves every
        optimizer as it was. (Moment values are not compared: each rank reads only its shard.)
        """
        self._agree_and_load(lambda: (self._shard_of(state_dict), None))

    def _agree_and_load(self, prepare, what: str = "ShardedOptimizer.load_state_dict()") -> None:
        """Run ``prepare() -> (local state dict, parameter buffer or None)`` and the shard
        optimizer's checks on every rank; load only if every rank passed and the ranks' step
        counts and hyper-parameters agree, else raise on all (see :func:`agree`)."""
        error, local, params, step_count, loaded = None, None, None, 0, None
        try:
            local, params = prepare()
            if self.optimizer is not None:
                self.optimizer._check_state_dict(local)
            step_count = local.get("step_count", 0)
            if isinstance(step_count, np.ndarray) and step_count.ndim == 0:
                step_count = step_count.item()
            if isinstance(step_count, bool) or not isinstance(step_count, numbers.Integral) or step_count < 0:
                raise ValueError(f"state_dict step_count must be an integer >= 0, got {step_count!r}")
            loaded = {"step_count": int(step_count)}
            if params is not None:  # the parameters every rank will hold: the same file contents
                loaded["parameters (CRC-32)"] = zlib.crc32(np.ascontiguousarray(params).view(np.uint8))
            for gi, g in enumerate(local["param_groups"]):
                loaded.update({f"param group {gi} {k}": _canon(v) for k, v in g.items() if k != "params"})
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, then is re-raised
            error = exc
        agree(self.comm, what, error, [loaded], ["state (step count, hyper-parameters, loaded parameters)"])
        try:
            if self.optimizer is not None:
                self.optimizer.load_state_dict(local)
            if params is not None:
                np.copyto(self.flat.buffer, params)
        except Exception:  # noqa: BLE001 - checked on every rank; the ranks can no longer be kept alike
            self._abort(what + " failed on rank {} after the ranks agreed to load")
        self._step_count = int(step_count)

    def _shard_of(self, sd: dict) -> dict:
        """This rank's shard of a consolidated state dict, shaped as the shard optimizer's."""
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        layout = self.flat.layout
        groups = sd.get("param_groups")
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self._groups):
            raise ValueError(f"state_dict has {len(groups) if isinstance(groups, (list, tuple)) else 'no'} "
                             f"param groups; this optimizer has {len(self._groups)}")
        for gi, (g, (sel, _)) in enumerate(zip(groups, self._groups)):
            if list(g.get("params", ())) != list(sel.names):
                raise ValueError(f"state_dict param group {gi} holds {g.get('params')}, this optimizer's holds "
                                 f"{list(sel.names)}")
        state = sd.get("state")
        if not isinstance(state, dict):
            raise TypeError("state_dict has no state dict")
        step_count = sd.get("step_count", 0)
        # the whole dict's structure, on every rank alike (not only the tensors of this shard)
        names = [n for sel, _ in self._groups for n in sel.names]
        missing = [n for n in names if not isinstance(state.get(n), dict)]
        if missing:
            raise ValueError(f"state_dict has no state for tensor(s) {missing}")
        extra = sorted(map(str, set(state) - set(names)))
        if extra:
            raise ValueError(f"state_dict has state for {extra}, which no param group holds")
        for name in names:
            shape = layout.shapes[layout.index(name)]
            for k, v in state[name].items():
                if isinstance(v, np.ndarray) and v.ndim > 0 and v.shape != shape:
                    raise ValueError(f"state_dict tensor {name!r}: {k} has shape {v.shape}, "
                                     f"the tensor has shape {shape}")
        out_state = {}
        for name, start in self._piece_start.items():
            if name not in state:
                continue  # a tensor in no group
            entry = state[name]
            shape = layout.shapes[layout.index(name)]
            n = self.shard.layout.sizes[self.shard.layout.index(name)]
            piece = {}
            for k, v in entry.items():
                if isinstance(v, np.ndarray) and v.ndim > 0:
                    check_array_type(v, f"state_dict tensor {name!r}: {k}")  # a matrix stays 2-D
                    if v.shape != shape:
                        raise ValueError(f"state_dict tensor {name!r}: {k} has shape {v.shape}, "
                                         f"the tensor has shape {shape}")
                    piece[k] = np.ascontiguousarray(v.reshape(-1)[start : start + n])
                else:
                    piece[k] = v
            out_state[name] = piece
        local_groups = []
        for g, (sel, _) in zip(groups, self._groups):
            local_groups.append({**{k: v for k, v in g.items() if k != "params"},
                                 "params": [n for n in sel.names if n in self._piece_start]})
        return {"optimizer": sd.get("optimizer"), "format": sd.get("format"), "step_count": step_count,
                "param_groups": local_groups, "state": out_state}

    def __repr__(self) -> str:
        return (f"ShardedOptimizer({self.optimizer_cls.__name__}, rank {self.rank} of {self.world_size}, "
                f"shard [{self.lo}, {self.hi}) of {self.flat.layout.size}, state {self.state_nbytes:,} bytes)")
