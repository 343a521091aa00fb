"""The optimizer engine for a :class:`~fastopt.FlatParams`: one kernel launch per step.

An optimizer whose ``params`` are a ``FlatParams``, a selection of one, or group dicts whose
``params`` are selections of ONE ``FlatParams`` runs here instead of the per-array path of
:class:`fastopt.Optimizer`. The whole buffer is cut into rows of one segment table:

- one *tensor row* per non-empty tensor: its group's scalars (``plan(hp, step, host)``),
  with column 0 the gradient scale (-1 for ``maximize``);
- one *padding row* per gap that alignment leaves after a tensor (and one for a gap before the
  first tensor, which a hand-built layout may have): the scalars of the same
  rule variant planned with ``lr = 0``, ``weight_decay = 0`` and ``eps = 1``, and a gradient
  scale of 0. Every rule then maps padding to itself: the scaled gradient is 0, moments that
  start at 0 stay 0, every denominator is at least 1 (never 0/0, whatever ``eps`` the group
  has), and the step is ``0 * finite``. Padding parameters therefore never change and never
  become NaN, even with ``eps = 0`` and finite garbage in the padding of a raw gradient
  array (NaN or inf there is an error: ``0 * inf`` is NaN). With ``grad_noise`` the padding
  rows' noise deviation is 0 too.

Gradient transforms (:mod:`fastopt.transforms`) work as on lists of arrays: the norm for
``clip_grad_norm`` / ``skip_nonfinite`` covers the optimizer's tensors only (not padding, not
tensors in no group), the clip factor goes into column 0, and ``grad_noise`` uses the noise
variant of the same launch, element ``j`` of the noise stream being buffer position ``j``.

One launch covers every row when all groups use the same rule variant (the usual case:
groups differ in ``lr``, ``weight_decay``, ``betas``...) and every tensor belongs to a group.
Otherwise there is one launch per maximal run of consecutive rows that share a variant;
tensors in no group are skipped (never read or written), like parameters left out of a
``torch.optim`` optimizer.

State buffers are flat too: one buffer per state name, with the parameters' layout.
Segments that share a group, a step count and host scalars form a *cohort* whose scalars are
planned once per step; normally there is one cohort per group.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import numpy as np

from . import _locking
from .flat import FlatLayout, FlatParams, FlatSelection, aligned_zeros, host_gradient_buffer
from .kernels import _build, _config

_FLAT_TYPES = (FlatParams, FlatSelection)


def is_flat(params) -> bool:
    """Whether optimizer ``params`` refer to a FlatParams (the flat engine then runs)."""
    if isinstance(params, _FLAT_TYPES):
        return True
    if isinstance(params, (list, tuple)):
        for item in params:
            if isinstance(item, _FLAT_TYPES):
                return True
            if isinstance(item, dict) and isinstance(item.get("params"), _FLAT_TYPES):
                return True
    return False


def padding_kind(g, index):
    """0 if ``g[index]`` is all zero, 2 if it holds NaN or inf, else 1 (one pass, no copy)."""
    kind = 0
    for j in index:
        x = g[j]
        if not math.isfinite(x):
            return 2
        if x != 0:
            kind = 1
    return kind


@functools.cache
def _padding_kind():
    from .kernels import _cache

    return _cache.jit(padding_kind, error_model=_config.ERROR_MODEL, nogil=True)


class _Segment:
    """One tensor of the flat buffer as seen by the optimizer's state-dict checks
    (``index`` is its name, ``param`` its view, ``group`` its param group)."""

    __slots__ = ("dtype", "group", "index", "param", "position", "shape", "size", "start")

    def __init__(self, name: str, view: np.ndarray, group: int, position: int, start: int):
        self.index = name
        self.param = view
        self.shape = view.shape
        self.dtype = view.dtype
        self.group = group
        self.position = position
        self.start = start
        self.size = view.size


class _Cohort:
    """Segments of one group with the same step count and host scalars."""

    __slots__ = ("group", "host", "pad_rows", "rows", "segments", "step")

    def __init__(self, group: int, segments: list[_Segment], step: int, host: dict,
                 real_row: np.ndarray, pad_row: np.ndarray):
        self.group = group
        self.segments = segments
        self.step = step
        self.host = host
        positions = np.array([s.position for s in segments], dtype=np.int64)
        rows = real_row[positions] if len(positions) else positions
        pads = pad_row[positions].reshape(-1) if len(positions) else positions
        self.rows = rows[rows >= 0]
        self.pad_rows = pads[pads >= 0]


class FlatEngine:
    """Steps, state and state dicts of an optimizer over one :class:`FlatParams`.

    Created by :class:`fastopt.Optimizer` when its ``params`` are flat; it sets the
    optimizer's ``param_groups`` (each ``"params"`` is a :class:`FlatSelection`) and reuses
    the optimizer's hyper-parameter validation and caching.
    """

    def __init__(self, opt, params):

        self.opt = opt
        self.kernel = opt.kernel
        flat, groups = self._parse(params)
        self.flat = flat
        self.device = flat.on_device  # a GPU buffer: fastopt._flat_cuda, one CUDA launch per step
        if self.device:
            from ._cuda_backend import CudaBackend

            opt._backend = CudaBackend()
        self.backend = opt._backend
        self.layout: FlatLayout = flat.layout
        layout = self.layout
        opt.param_groups = []
        opt._slots = []
        opt._group_slots = []
        opt._caches = []
        self.selections = [selection for selection, _ in groups]  # what each group's params must stay
        owner: dict[str, int] = {}
        for gi, (selection, overrides) in enumerate(groups):
            group = opt._new_group(gi, selection, overrides)
            segments = []
            for name in selection.names:
                if name in owner:
                    raise ValueError(f"tensor {name!r} is in param groups {owner[name]} and {gi}; "
                                     "each tensor may be in one group only")
                owner[name] = gi
                position = layout.index(name)
                segments.append(_Segment(name, flat[name], gi, position, layout.offsets[position]))
            opt.param_groups.append(group)
            opt._group_slots.append(segments)
            opt._slots.extend(segments)
        if not opt._slots:
            raise ValueError("optimizer got an empty parameter list")
        opt._ncols = max(rule.ncols for rule in self.kernel.RULES) + opt.transforms.extra_columns
        opt._step_count = 0
        self._build_rows()
        self.buffers: dict[str, np.ndarray] = {}
        self._initialized: set[tuple[int, str]] = set()
        self._synced: dict[int, tuple] = {}  # group -> the state names its buffers were last made for
        init_host = getattr(self.kernel, "host_state", dict)
        self.cohorts = [
            _Cohort(gi, segs, 0, init_host(), self.real_row, self.pad_row)
            for gi, segs in enumerate(opt._group_slots)
        ]
        self._cohort_of = {s.index: c for c in self.cohorts for s in c.segments}
        for gi in range(len(opt.param_groups)):
            self._sync_state(gi, self.kernel.buffers(opt._group_hp(gi)))
        self._runs_cache: dict[tuple, list] = {}

    # -- structure ----------------------------------------------------------------------
    @staticmethod
    def _parse(params) -> tuple[FlatParams, list[tuple[FlatSelection, dict]]]:
        def selection(p, where: str) -> FlatSelection:
            if isinstance(p, FlatParams):
                return FlatSelection(p, p.names)
            if isinstance(p, FlatSelection):
                return p
            raise TypeError(f"{where}: params are a FlatParams elsewhere, so this group's params must be a "
                            f"FlatParams or a selection of it (flat.select(...)), got {type(p).__name__}")

        if isinstance(params, _FLAT_TYPES):
            groups = [(selection(params, "params"), {})]
        else:
            items = list(params)
            if not all(isinstance(it, dict) for it in items):
                raise TypeError("pass several selections of a FlatParams as param group dicts: "
                                "[{'params': flat.select('w*')}, {'params': flat.select('b*'), ...}]")
            groups = []
            for gi, g in enumerate(items):
                if "params" not in g:
                    raise ValueError(f"param group {gi} has no 'params' entry")
                groups.append((selection(g["params"], f"param group {gi}"),
                               {k: v for k, v in g.items() if k != "params"}))
        flats = {id(sel.flat): sel.flat for sel, _ in groups}
        if len(flats) > 1:
            raise ValueError("param groups select tensors of different FlatParams; one optimizer updates "
                             "one FlatParams (put all tensors in one, or use one optimizer per buffer)")
        return groups[0][0].flat, groups

    def _build_rows(self) -> None:
        """Cut the buffer into tensor and padding rows: ``bounds``, ``table`` and row maps."""
        layout = self.layout
        n = len(layout.names)
        bounds = [0]
        real_row = np.full(n, -1, dtype=np.int64)
        pad_row = np.full((n, 2), -1, dtype=np.int64)  # the padding after a tensor; before the first
        owner = []  # position of the tensor each row belongs to
        sizes = layout.sizes
        if n and layout.offsets[0] > 0:  # a hand-built layout may start with padding
            pad_row[0, 1] = len(owner)
            owner.append(0)
            bounds.append(layout.offsets[0])
        for i, (start, size) in enumerate(zip(layout.offsets, sizes)):
            stop = layout.offsets[i + 1] if i + 1 < n else layout.size
            if size:
                real_row[i] = len(owner)
                owner.append(i)
                bounds.append(start + size)
            if stop > start + size:
                pad_row[i, 0] = len(owner)
                owner.append(i)
                bounds.append(stop)
        self.bounds = np.array(bounds, dtype=np.int64)
        self.real_row = real_row
        self.pad_row = pad_row
        self.row_owner = np.array(owner, dtype=np.int64)
        self.table = np.zeros((len(owner), self.opt._ncols), dtype=layout.dtype)
        self._row = np.zeros(self.opt._ncols, dtype=np.float64)  # one row, assembled per cohort
        # the element ranges of tensors in a group (merged when adjacent) and the padding
        # inside them: the gradient norm of clip_grad_norm / skip_nonfinite covers exactly these
        covered = sorted(seg.position for seg in self.opt._slots)
        ranges: list[list[int]] = []
        pads = []
        for i in covered:
            start, size = layout.offsets[i], sizes[i]
            stop = layout.offsets[i + 1] if i + 1 < n else layout.size
            lead = 0 if i == 0 else start  # the leading padding is the first tensor's
            if ranges and ranges[-1][1] == lead:
                ranges[-1][1] = stop
            else:
                ranges.append([lead, stop])
            if start > lead:
                pads.append(np.arange(lead, start, dtype=np.int64))
            if stop > start + size:
                pads.append(np.arange(start + size, stop, dtype=np.int64))
        self._covered = [(lo, hi) for lo, hi in ranges]
        self._pad_index = np.concatenate(pads) if pads else np.zeros(0, np.int64)
        self._device_padding = None
        if self.device and self._pad_index.size:
            from ._flat_cuda import DevicePadding

            self._device_padding = DevicePadding(self._pad_index)

    def _ensure_state(self, gi: int, initial: dict[str, float]) -> None:
        """Allocate missing flat state buffers and fill group ``gi``'s tensors with their
        initial values the first time the group needs them."""
        for name, value in initial.items():
            fresh = name not in self.buffers  # zeros everywhere
            if fresh:
                if self.device:
                    from . import _flat_cuda

                    self.buffers[name] = _flat_cuda.zeros(self.layout.size, self.layout.dtype)
                else:
                    self.buffers[name] = aligned_zeros(self.layout.size, self.layout.dtype, self.layout.align)
            if (gi, name) not in self._initialized:
                buf = self.buffers[name]
                if value != 0 or not fresh:
                    for seg in self.opt._group_slots[gi]:
                        if self.device:
                            from . import _flat_cuda

                            _flat_cuda.fill(buf[seg.start : seg.start + seg.size], value)
                        else:
                            buf[seg.start : seg.start + seg.size] = value
                self._initialized.add((gi, name))

    def _sync_state(self, gi: int, needed: dict[str, float]) -> None:
        """Make group ``gi``'s state exactly ``needed`` (name -> initial value): buffers an
        option switched off no longer count as initialized for the group (switched on again
        they restart at their initial value), and the rule may reset host scalars that went
        with them (``kernel.discard``); missing ones are filled."""
        dropped = [n for g, n in self._initialized if g == gi and n not in needed]
        for name in dropped:
            self._initialized.discard((gi, name))
        if dropped and hasattr(self.kernel, "discard"):
            for cohort in self.cohorts:
                if cohort.group == gi:
                    cohort.host = self.kernel.discard(cohort.host, dropped)
        self._ensure_state(gi, needed)
        self._synced[gi] = tuple(needed)

    def _runs(self, variants: tuple) -> list[tuple]:
        """Launches for one assignment of rule variants to cohorts (cached): maximal runs of
        consecutive rows with the same variant, skipping rows of tensors in no group."""
        key = tuple(map(id, variants))  # rules are module constants; ids hash faster than Rules
        runs = self._runs_cache.get(key)
        if runs is not None:
            return runs
        row_rule: list[Any] = [None] * len(self.row_owner)
        for cohort, rule in zip(self.cohorts, variants):
            for r in cohort.rows:
                row_rule[r] = rule
            for r in cohort.pad_rows:
                row_rule[r] = rule
        runs = []
        a = 0
        nrows = len(row_rule)
        while a < nrows:
            rule = row_rule[a]
            b = a + 1
            while b < nrows and row_rule[b] is rule:
                b += 1
            if rule is not None:
                lo, hi = int(self.bounds[a]), int(self.bounds[b])
                if a == 0 and b == nrows:
                    runs.append((rule, lo, hi, self.bounds, self.table))
                else:
                    runs.append((rule, lo, hi, self.bounds[a : b + 1] - lo, self.table[a:b]))
            a = b
        if len(self._runs_cache) > 64:
            self._runs_cache.clear()
        self._runs_cache[key] = runs
        return runs

    def _regroup(self, per_segment: dict[str, tuple[int, dict]]) -> None:
        """Rebuild the cohorts from each segment's (step, host)."""
        keyed: dict[tuple, list[_Segment]] = {}
        hosts: dict[tuple, dict] = {}
        for segs in self.opt._group_slots:
            for seg in segs:
                step, host = per_segment[seg.index]
                key = (seg.group, step, tuple(sorted(host.items())))
                keyed.setdefault(key, []).append(seg)
                hosts[key] = host
        self.cohorts = [_Cohort(key[0], segs, key[1], dict(hosts[key]), self.real_row, self.pad_row)
                        for key, segs in keyed.items()]
        self._cohort_of = {s.index: c for c in self.cohorts for s in c.segments}
        self._runs_cache.clear()

    # -- the step -----------------------------------------------------------------------
    def _grad_buffer(self, grads) -> np.ndarray:
        if self.device:
            return self._device_grad_buffer(grads)
        g = host_gradient_buffer(grads, self.layout, self.flat.buffer, "step() of an optimizer over a FlatParams")
        for name, buf in self.buffers.items():
            if np.may_share_memory(g, buf):
                raise ValueError(f"the gradient shares memory with the optimizer's {name} state")
        return g

    def _device_grad_buffer(self, grads):
        """The gradient of a GPU FlatParams: a FlatParams with the same layout on the GPU, or a
        1-D GPU array of the buffer's size and dtype (zero-copy); checked like the host's."""
        from . import _flat_cuda
        from ._backend import is_device_array

        layout = self.layout
        if isinstance(grads, FlatParams):
            if grads.layout is not layout and grads.layout != layout:
                raise ValueError("the gradient FlatParams has a different layout from the parameters; "
                                 "make gradients with flat.zeros_like()")
            if not grads.on_device:
                raise TypeError("the parameters' FlatParams is on a GPU but the gradient's is on the host; "
                                "make gradients with flat.zeros_like() (or move them with .to_device())")
            g = grads.buffer
        elif isinstance(grads, np.ndarray) or not is_device_array(grads):
            raise TypeError("step() of an optimizer over a GPU FlatParams takes the gradient as a GPU "
                            f"FlatParams with the same layout (flat.zeros_like()) or a 1-D GPU array, got "
                            f"{type(grads).__name__}")
        else:
            try:
                g = _flat_cuda.as_device_buffer(grads, layout.size, layout.dtype)
            except ValueError as exc:
                raise ValueError(f"gradient buffer: {exc} (padding included; see flat.zeros_like())") from None
        if _flat_cuda.overlaps(g, self.flat.buffer):
            raise ValueError("the gradient shares memory with the parameters; pass a separate buffer "
                             "(flat.zeros_like())")
        for name, buf in self.buffers.items():
            if _flat_cuda.overlaps(g, buf):
                raise ValueError(f"the gradient shares memory with the optimizer's {name} state")
        return g

    def _check_padding(self, g: np.ndarray) -> bool:
        """Whether the gradient's padding (inside the updated ranges) is all zero; a NaN or
        inf there is an error, since padding rows scale the gradient by 0 and 0 * inf is NaN."""
        if not self._pad_index.size:
            return True
        if self.device:
            kind = self._device_padding.kind(g)
        else:
            kind = _padding_kind()(g, self._pad_index)
        if kind == 2:
            raise ValueError("the gradient buffer holds NaN or inf in the padding between tensors; keep "
                             "padding finite (flat.zeros_like() keeps it zero)")
        return kind == 0

    def _norm_arrays(self, g: np.ndarray, padding_zero: bool) -> list[np.ndarray]:
        """The gradient as arrays whose elements are exactly the optimizer's tensors: the
        covered ranges when their padding is zero (always, with ``zeros_like()``), else one
        view per tensor (slower for many tensors)."""
        if padding_zero:
            return [g[lo:hi] for lo, hi in self._covered]
        return [g[seg.start : seg.start + seg.size] for seg in self.opt._slots]

    @staticmethod
    def _frozen(hp: dict) -> dict:
        """Hyper-parameters under which every rule maps zero padding to itself (see module doc)."""
        frozen = {**hp, "lr": 0.0, "weight_decay": 0.0, "maximize": False}
        if "eps" in hp:
            frozen["eps"] = 1.0
        return frozen

    @_locking.synchronized_on("opt")  # the optimizer's lock (fastopt._locking)
    def step(self, grads) -> None:
        """One update of every tensor in a group, in as few launches as the variants allow."""
        from .optimizer import _checked_plan

        g = self._grad_buffer(grads)
        padding_zero = self._check_padding(g)
        opt = self.opt
        kernel = self.kernel
        hps = opt._hypers()
        if not self.device and not self.flat.buffer.flags.writeable:
            raise ValueError("the FlatParams buffer was made read-only after the optimizer was built; "
                             "fastopt updates parameters in place")
        plans = []  # every cohort planned and checked before anything changes
        dtype = self.layout.dtype
        for cohort in self.cohorts:
            hp = hps[cohort.group]
            host = dict(cohort.host)
            where = cohort.segments[0].index if cohort.segments else cohort.group
            rule, scalars = _checked_plan(kernel.plan, hp, cohort.step + 1, host, dtype, where)
            frozen_rule, frozen = _checked_plan(kernel.plan, self._frozen(hp), cohort.step + 1, dict(cohort.host),
                                                dtype, where)
            if frozen_rule is not rule:  # a rule whose variant depends on lr/eps: never so far
                raise RuntimeError(f"{kernel.__name__}.plan picks another variant for padding rows")
            plans.append((cohort, hp, rule, scalars, frozen, host))
        scale, noise = 1.0, None
        if opt.transforms.active:  # clip_grad_norm, skip_nonfinite, grad_noise: fastopt.transforms
            begun = opt.transforms.begin_step(opt, self._norm_arrays(g, padding_zero))
            if begun is None:  # skipped: nothing changes
                return
            scale, noise = begun
        table = self.table
        synced = self._synced
        for cohort, hp, rule, scalars, frozen, _ in plans:
            if synced.get(cohort.group) != rule.state:  # an option was switched on or off
                self._sync_state(cohort.group, kernel.buffers(hp))
            k = len(scalars) + 1
            sign = -1.0 if hp["maximize"] else 1.0
            row = self._row
            row[0] = sign * scale
            row[1:k] = scalars
            if noise is not None:  # the noise standard deviation, one past the rule's scalars
                row[rule.ncols] = sign * noise.std
            table[cohort.rows] = row  # whole rows: one scatter per cohort and kind
            if cohort.pad_rows.size:
                row[0] = 0.0
                row[1:k] = frozen
                if noise is not None:
                    row[rule.ncols] = 0.0
                table[cohort.pad_rows] = row
        param = self.flat.buffer
        buffers = self.buffers
        whole = param.size
        for rule, lo, hi, bounds, rows in self._runs(tuple(p[2] for p in plans)):
            if lo == 0 and hi == whole:
                p_, g_, states = param, g, [buffers[s] for s in rule.state]
            else:
                p_, g_, states = param[lo:hi], g[lo:hi], [buffers[s][lo:hi] for s in rule.state]
            if self.device:  # the segmented CUDA kernel (bounds and rows copied per launch)
                if noise is None:
                    self.backend.run(rule, p_, g_, states, bounds, rows)
                else:
                    self.backend.run_noise(rule, p_, g_, states, bounds, rows, noise.key, lo)
            elif noise is None:
                _build.run_cpu(rule, p_, g_, states, bounds, rows)
            else:  # element j of the noise stream is buffer position j
                launch = _build.cpu_noise_kernel(rule, _build.use_parallel(rule, hi - lo), param.dtype)
                launch(p_, g_, *states, bounds, rows, noise.key, lo)
        for cohort, *_, host in plans:
            cohort.step += 1
            cohort.host = host
        opt._step_count += 1

    # -- state --------------------------------------------------------------------------
    def _group_buffer_names(self, gi: int) -> dict[str, float]:
        names = self.kernel.buffers(self.opt._group_hp(gi))
        if self._synced.get(gi) != tuple(names):
            self._sync_state(gi, names)
        return names

    def _view(self, name: str, seg: _Segment) -> np.ndarray:
        return self.buffers[name][seg.start : seg.start + seg.size].reshape(seg.param.shape)

    def state(self) -> dict[str, dict]:
        """Per-tensor state keyed by name: ``step``, host scalars and live views of the flat
        state buffers."""
        out = {}
        for gi, segs in enumerate(self.opt._group_slots):
            names = self._synced[gi]  # what the group's state holds now (edits apply at the next step)
            for seg in segs:
                cohort = self._cohort_of[seg.index]
                out[seg.index] = {"step": cohort.step, **cohort.host,
                                  **{n: self._view(n, seg) for n in names}}
        return out

    def flat_state(self) -> dict[str, FlatParams]:
        """The flat state buffers, each wrapped in the parameters' layout (live, not copies)."""
        return {name: FlatParams.from_layout(self.layout, buf) for name, buf in self.buffers.items()}

    @_locking.synchronized_on("opt")  # the optimizer's lock (fastopt._locking)
    def state_dict(self) -> dict:
        """Like :meth:`fastopt.Optimizer.state_dict`, keyed by tensor name."""
        from .optimizer import STATE_FORMAT

        opt = self.opt
        for gi in range(len(opt._group_slots)):  # validated, state made what the options need
            self._group_buffer_names(gi)
        groups = []
        for group, segs in zip(opt.param_groups, opt._group_slots):
            g = {k: (None if k == "lr" and callable(v) else v) for k, v in group.items() if k != "params"}
            g["params"] = [s.index for s in segs]
            groups.append(g)
        to_host = self.backend.to_host  # a copy (from the GPU when the buffer is there)
        state = {name: {k: (v if isinstance(v, numbers.Real) else to_host(v)) for k, v in entry.items()}
                 for name, entry in self.state().items()}
        return {"optimizer": type(opt).__name__, "format": STATE_FORMAT, "step_count": opt._step_count,
                "param_groups": groups, "state": state}

    @_locking.synchronized_on("opt")  # the optimizer's lock (fastopt._locking)
    def load_state_dict(self, state_dict: dict) -> None:
        """Check ``state_dict`` whole (as the list path does), then copy it in."""
        opt = self.opt
        from .optimizer import _replace_group

        plan = opt._check_state_dict(state_dict)
        for gi, new_group in plan["groups"]:
            _replace_group(opt.param_groups[gi], new_group)
        per_segment = {}
        for seg, step, host, buffers in plan["slots"]:
            if self._synced.get(seg.group) != tuple(buffers):
                self._sync_state(seg.group, dict.fromkeys(buffers, 0.0))
            for name, value in buffers.items():
                self.backend.copy_in(self._view(name, seg), value)
            per_segment[seg.index] = (step, host)
        self._regroup(per_segment)
        opt._step_count = plan["step_count"]

