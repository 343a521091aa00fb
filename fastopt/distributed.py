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

``import fastopt`` never imports mpi4py; this module imports it when an optimizer is built.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ._validation import check_array_type
from .flat import FlatLayout, FlatParams, FlatSelection, aligned_zeros, host_gradient_buffer
from .kernels import reduce
from .optimizer import Optimizer
from .transforms import GradTransforms, clip_coefficient

__all__ = ["ShardedOptimizer", "shard_bounds"]


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastopt.distributed needs mpi4py and an MPI library: pip install 'fastopt[mpi]' "
                          "(mpi4py with the mpich wheel), or mpi4py built against your system MPI") from exc
    return MPI


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
        Every rank must pass the same layout and groups (checked: a mismatch raises on every
        rank); the parameters are broadcast from rank 0, so every rank starts from rank 0's
        values, as in torch's DistributedDataParallel.
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
    timings : dict, cumulative seconds of the steps' phases: ``"reduce_scatter"``, ``"norm"``
        (zeroing padding; for clipping or skipping, the local norm and its ``Allreduce``),
        ``"update"`` (the fused kernel), ``"allgather"``; and the number of ``"steps"``
    """

    def __init__(self, optimizer_cls: type[Optimizer], params, comm, *, align: int | None = None,
                 clip_grad_norm: float | None = None, skip_nonfinite: bool = False, **options: Any):
        MPI = _mpi()
        if not (isinstance(optimizer_cls, type) and issubclass(optimizer_cls, Optimizer)):
            raise TypeError(f"optimizer_cls must be a fastopt optimizer class (fo.Adam, ...), got {optimizer_cls!r}")
        if not isinstance(comm, MPI.Comm) or comm.Is_inter():
            raise TypeError(f"comm must be an mpi4py intra-communicator (MPI.COMM_WORLD), got {comm!r}")
        if options.get("grad_noise") is not None:
            raise NotImplementedError("grad_noise is not supported by ShardedOptimizer")
        options.pop("grad_noise", None)
        options.pop("seed", None)
        checked = GradTransforms(clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, seed=0)
        self.clip_grad_norm = checked.clip_grad_norm
        self.skip_nonfinite = checked.skip_nonfinite
        flat, groups = self._parse(params)
        layout = flat.layout
        if align is None:
            align = layout.align
        if isinstance(align, bool) or not isinstance(align, int) or align < layout.align or align % layout.align:
            raise ValueError(f"align must be a multiple of the FlatParams' alignment ({layout.align} bytes), "
                             f"got {align!r}")
        signature = (layout.names, layout.shapes, str(layout.dtype), layout.size, align,
                     tuple(sel.names for sel, _ in groups), optimizer_cls.__name__)
        signatures = comm.allgather(signature)
        if any(sig != signatures[0] for sig in signatures):
            bad = [r for r, sig in enumerate(signatures) if sig != signatures[0]]
            raise ValueError(f"ranks {bad} pass another model, param groups, alignment or optimizer than rank 0 "
                             "(tensor names, shapes, dtype and groups must be the same on every rank)")
        comm.Bcast(flat.buffer, root=0)
        self.MPI = MPI
        self.comm = comm
        self.rank = comm.Get_rank()
        self.world_size = comm.Get_size()
        self.flat = flat
        self.optimizer_cls = optimizer_cls
        self.align = align
        self.bounds = shard_bounds(layout.size, self.world_size, align // layout.dtype.itemsize)
        self._counts = np.array([hi - lo for lo, hi in self.bounds], dtype=np.int64)
        self._displs = np.array([lo for lo, _ in self.bounds], dtype=np.int64)
        self._mpi_type = MPI.FLOAT if layout.dtype == np.float32 else MPI.DOUBLE
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
        if self.optimizer is None:  # nothing to update here; still check the options as the others do
            optimizer_cls(FlatParams({"probe": 1}, layout.dtype), **options)
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
        self.timings = {"reduce_scatter": 0.0, "norm": 0.0, "update": 0.0, "allgather": 0.0, "steps": 0}

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

    def step(self, local_grads) -> None:
        """Average the ranks' gradients, update this rank's shard, all-gather the parameters.

        Collective: every rank of ``comm`` must call it. ``local_grads`` is this rank's
        gradient, a ``FlatParams`` with the parameters' layout or its buffer (not modified).
        Padding between tensors is ignored. With ``skip_nonfinite``, a step in which any
        rank's gradient holds NaN or inf changes nothing on any rank.
        """
        MPI = self.MPI
        g = self._check_grads(local_grads)
        t0 = time.perf_counter()
        self.comm.Reduce_scatter(g, [self._grad, self._mpi_type], recvcounts=self._counts, op=MPI.SUM)
        t1 = time.perf_counter()
        gs = self._grad  # the SUM of the ranks' gradients: 1/W goes into the kernel's gradient scale
        if self._pad_index.size:
            gs[self._pad_index] = 0
        inv_world = 1.0 / self.world_size
        scale = inv_world
        if self.clip_grad_norm is not None or self.skip_nonfinite:
            local = np.zeros(2, np.float64)
            for a, b in self._norm_ranges:
                s, finite = reduce.sumsq(gs[a:b])
                local[0] += s
                local[1] += 0.0 if finite else 1.0
            total = np.empty(2, np.float64)
            self.comm.Allreduce(local, total, op=MPI.SUM)
            norm = math.sqrt(total[0]) * inv_world  # the norm of the averaged gradient
            self.last_grad_norm = norm
            if self.skip_nonfinite and total[1] > 0:
                self.skipped_steps += 1
                self.last_step_skipped = True
                self.timings["norm"] += time.perf_counter() - t1
                return
            if self.clip_grad_norm is not None:
                scale = inv_world * clip_coefficient(norm, self.clip_grad_norm)
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
        tm["reduce_scatter"] += t1 - t0
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
    def _local_pieces(self) -> dict[str, dict]:
        """This rank's state per tensor piece: ``start`` in the tensor, step, host scalars and
        1-D copies of the state buffers."""
        if self.optimizer is None:
            return {}
        sd = self.optimizer.state_dict()
        return {name: {"start": self._piece_start[name], **entry} for name, entry in sd["state"].items()}

    def consolidated_state_dict(self, root: int | None = 0) -> dict | None:
        """The whole optimizer state, gathered: a state dict of a plain, unsharded
        ``optimizer_cls`` over the same ``FlatParams`` (keyed by tensor name, buffers of the
        tensors' shapes), so it loads into one with any world size, or into one process.

        Collective. Returned on ``root`` (None elsewhere), or on every rank if ``root`` is None.
        """
        pieces = self._local_pieces()
        gathered = self.comm.allgather(pieces) if root is None else self.comm.gather(pieces, root=root)
        if gathered is None:
            return None
        if self.optimizer is None:
            raise RuntimeError("consolidated_state_dict needs a root whose shard holds a tensor; use root=None")
        layout = self.flat.layout
        sd = self.optimizer.state_dict()
        state: dict[str, dict] = {}
        for rank_pieces in gathered:
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

        Collective. Every rank checks its part (via the shard optimizer's own checks) and the
        ranks agree before any of them changes anything, so a bad dict raises on every rank and
        leaves every optimizer as it was.
        """
        self._agree_and_load(lambda: (self._shard_of(state_dict), None))

    def _agree_and_load(self, prepare) -> None:
        """Run ``prepare() -> (local state dict, parameter buffer or None)`` and the shard
        optimizer's checks on every rank; load only if every rank passed, else raise on all."""
        error: Exception | None = None
        try:
            local, params = prepare()
            if self.optimizer is not None:
                self.optimizer._check_state_dict(local)
            step_count = local.get("step_count", 0)
            if isinstance(step_count, bool) or not isinstance(step_count, (int, np.integer)) or step_count < 0:
                raise ValueError(f"state_dict step_count must be an integer >= 0, got {step_count!r}")
        except Exception as exc:  # noqa: BLE001 - any failure must reach the other ranks, then is re-raised
            error = exc
        failed = self.comm.allreduce(1 if error is not None else 0, op=self.MPI.SUM)
        if error is not None:
            raise error
        if failed:
            raise ValueError(f"the state was rejected on {failed} other rank(s); nothing was loaded")
        if self.optimizer is not None:
            self.optimizer.load_state_dict(local)
        if params is not None:
            np.copyto(self.flat.buffer, params)
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
        out_state = {}
        for name, start in self._piece_start.items():
            if name not in state:
                continue  # a tensor in no group: the shard optimizer's own check reports a missing one
            entry = state[name]
            if not isinstance(entry, dict):
                raise TypeError(f"state_dict has no state dict for tensor {name!r}")
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
