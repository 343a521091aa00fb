"""The optimizer base class: parameter groups, per-parameter state, one fused kernel call per
parameter per step, and ``state_dict`` / ``load_state_dict``.

Each optimizer class names a kernel module (``fastopt.kernels.adam``, ...) that owns the
rule's math: its defaults and hyper-parameter checks, the state buffers it needs, and
``plan(hp, step, host)``, which turns the hyper-parameters of one step into the float64
scalars the kernel reads. The class adds the user-facing signature and docstring.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType
from typing import Any

import numpy as np

from . import _backend, _locking
from ._flat_engine import FlatEngine, is_flat
from .kernels import _build
from .kernels import _hyper as H
from .transforms import GradTransforms

STATE_FORMAT = 1


class _Slot:
    """One parameter and everything its update needs, allocated once."""

    __slots__ = ("param", "flat", "buffers", "flat_buffers", "host", "step", "table", "bounds",
                 "group", "index", "_args_rule", "_args", "backend", "shape", "dtype")

    def __init__(self, param, group: int, index: int, ncols: int, backend=_backend.HOST):
        self.param = param
        self.backend = backend
        self.shape, self.dtype = backend.shape_dtype(param)
        self.flat = backend.flat(param)
        self.buffers: dict[str, np.ndarray] = {}
        self.flat_buffers: dict[str, np.ndarray] = {}
        self.host: dict[str, Any] = {}
        self.step = 0
        self.table = np.zeros((1, ncols), dtype=self.dtype)
        self.bounds = np.array([0, math.prod(self.shape)], dtype=np.int64)
        self.group = group
        self.index = index
        self._args_rule = None
        self._args: tuple = ()

    def ensure_buffers(self, initial: dict[str, float]) -> None:
        for name, value in initial.items():
            if name not in self.buffers:
                buf = self.backend.full_like(self.param, value)
                self.buffers[name] = buf
                self.flat_buffers[name] = self.backend.flat(buf)

    def run(self, rule: _build.Rule, grad) -> None:
        """One fused update of this parameter by ``rule`` from the flat gradient ``grad``
        (the launcher and the state arguments are cached per rule)."""
        if rule is not self._args_rule:
            launch = self.backend.launcher(rule, int(self.bounds[-1]))
            self._args = (launch, tuple(self.flat_buffers[name] for name in rule.state))
            self._args_rule = rule
        launch, states = self._args
        launch(self.flat, grad, states, self.bounds, self.table)


class ParamGroup(dict):
    """A param group: a plain dict that notes when it is edited, so that a step re-validates
    its hyper-parameters only after a change (``opt.param_groups[0]["lr"] = 0.1``)."""

    __slots__ = ("edited",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.edited = True

    def __setitem__(self, key, value):
        self.edited = True
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self.edited = True
        super().__delitem__(key)

    def update(self, *args, **kwargs):
        self.edited = True
        super().update(*args, **kwargs)

    def setdefault(self, key, default=None):
        self.edited = True
        return super().setdefault(key, default)

    def pop(self, *args):
        self.edited = True
        return super().pop(*args)

    def popitem(self):
        self.edited = True
        return super().popitem()

    def clear(self):
        self.edited = True
        super().clear()


class _GroupCache:
    """The validated hyper-parameters of a group, recomputed only when the user edits it."""

    __slots__ = ("group", "signature", "hp", "schedule")

    def __init__(self):
        self.group = None
        self.signature = None
        self.hp: dict = {}
        self.schedule = None


def _check_lr_value(value) -> float:
    return H.learning_rate("lr", value)


class Optimizer:
    """Base class of fastopt's optimizers (see :class:`fastopt.Adam` for the common API).

    Parameters
    ----------
    params:
        One array, a sequence of arrays, or a sequence of group dicts
        (``{"params": [w], "weight_decay": 1e-2}``) whose keys override the defaults.
        Or a :class:`~fastopt.FlatParams`, or group dicts whose ``params`` are selections of
        one (``flat.select("w*")``): then one kernel launch updates every group
        (see :mod:`fastopt._flat_engine`) and ``step`` takes ``flat.zeros_like()``.
        NumPy arrays run on the CPU kernels; GPU arrays (anything exposing
        ``__cuda_array_interface__``: CuPy, PyTorch CUDA tensors, Numba device arrays) run on
        the CUDA kernels, zero-copy, with their state on the same GPU. All on one device.
    clip_grad_norm, skip_nonfinite, grad_noise, seed:
        Gradient transforms fused into the update (see :mod:`fastopt.transforms`): clip the
        global L2 norm, skip steps with NaN/inf gradients, add annealed Gaussian noise.
    **hyper:
        The optimizer's hyper-parameters; ``lr`` may be a callable ``step -> lr``.

    Attributes
    ----------
    transforms : GradTransforms, the validated transform options
    last_grad_norm : float or None, the global gradient norm of the last step (when computed)
    last_step_skipped : bool, whether ``skip_nonfinite`` skipped the last step
    skipped_steps : int, steps skipped by ``skip_nonfinite``

    Notes
    -----
    Threads: ``step``, ``state_dict``, ``load_state_dict``, ``fastopt.save`` and
    ``fastopt.load`` of one optimizer hold its lock (:mod:`fastopt._locking`), so calls from
    several threads run one at a time and a state dict or checkpoint holds one step's values.
    Processes: a forked child steps with its parent's numbers (:mod:`fastopt.kernels._threads`;
    ``docs/fork_and_threads.md``).
    """

    kernel: ModuleType
    #: Options the class fixes (AdamW fixes ``decoupled_weight_decay=True``).
    forced: dict = {}
    #: The engine of an optimizer over a FlatParams (one launch per step), else None.
    _flat: FlatEngine | None = None

    def __init__(self, params, *, clip_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 grad_noise: tuple[float, float] | None = None, seed: int | None = None, **hyper):
        self.transforms = GradTransforms(clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite,
                                         grad_noise=grad_noise, seed=seed)
        self.last_grad_norm: float | None = None
        self.last_step_skipped = False
        self.skipped_steps = 0
        checks = self.kernel.CHECKS
        defaults = {**hyper, **self.forced}
        self._check_hyper(defaults, "")
        self.defaults = defaults
        if is_flat(params):  # a FlatParams or selections of one: see fastopt._flat_engine
            self._backend = _backend.HOST
            self._flat = FlatEngine(self, params)
            return
        self._single = _backend.is_array(params)
        groups = self._parse_groups(params)
        self._backend = backend = _backend.select([p for arrays, _ in groups for p in arrays])
        self._ncols = max(rule.ncols for rule in self.kernel.RULES) + self.transforms.extra_columns
        self.param_groups: list[dict] = []
        self._slots: list[_Slot] = []
        self._group_slots: list[list[_Slot]] = []
        names = []
        for gi, (arrays, overrides) in enumerate(groups):
            unknown = sorted(set(overrides) - set(checks))
            if unknown:
                raise TypeError(f"param group {gi} has unknown option(s) {', '.join(unknown)}")
            group = {**defaults, **overrides, **self.forced}
            self._check_hyper(group, f"param group {gi}: ")
            slots = []
            for pi, p in enumerate(arrays):
                where = f"param group {gi}, parameter {pi}" if len(groups) > 1 else f"parameter {len(self._slots)}"
                backend.check_param(p, where)
                names.append(where)
                slot = _Slot(p, gi, len(self._slots), self._ncols, backend)
                self._slots.append(slot)
                slots.append(slot)
            self.param_groups.append(ParamGroup({"params": list(arrays), **group}))
            self._group_slots.append(slots)
        if not self._slots:
            raise ValueError("optimizer got an empty parameter list")
        backend.check_no_overlap([s.param for s in self._slots], names)
        self.transforms.bind([int(s.bounds[-1]) for s in self._slots])
        self._caches = [_GroupCache() for _ in self.param_groups]
        self._step_count = 0
        for gi, slots in enumerate(self._group_slots):
            hp = self._resolve(gi)
            init_host = getattr(self.kernel, "host_state", dict)
            for slot in slots:
                slot.ensure_buffers(self.kernel.buffers(hp))
                slot.host = init_host()

    # -- hyper-parameters ---------------------------------------------------------------
    def _check_hyper(self, hp: dict, where: str) -> dict:
        """Validate ``hp`` (a schedule ``lr`` is checked at each step instead); messages start
        with ``where``."""
        values = {k: v for k, v in hp.items() if not (k == "lr" and callable(v))}
        check = getattr(self.kernel, "check", None)  # constraints between options
        try:
            checked = H.validate(values, self.kernel.CHECKS)
            if check is not None and set(hp) >= set(self.kernel.CHECKS):
                check({**hp, **checked})
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{where}{exc}") from None
        return checked

    def _resolve(self, gi: int) -> dict:
        """The validated hyper-parameters of group ``gi`` for the coming step (lr evaluated)."""
        group = self.param_groups[gi]
        cache = self._caches[gi]
        if group is not cache.group or getattr(group, "edited", True):
            self._revalidate(gi, group, cache)
        hp = cache.hp
        if cache.schedule is not None:
            hp["lr"] = _check_lr_value(cache.schedule(self._step_count))
        return hp

    def _revalidate(self, gi: int, group: dict, cache: _GroupCache) -> None:
        try:
            signature = tuple(group[k] for k in self.kernel.CHECKS)
        except KeyError as exc:
            raise ValueError(f"param group {gi} has no {exc.args[0]!r} entry") from None
        if signature != cache.signature:
            unknown = set(group) - set(self.kernel.CHECKS) - {"params"}
            if unknown:
                raise TypeError(f"param group {gi} has unknown option(s) {', '.join(sorted(unknown))}")
            cache.hp = self._check_hyper({k: group[k] for k in self.kernel.CHECKS}, f"param group {gi}: ")
            cache.signature = signature
            lr = group["lr"]
            cache.schedule = lr if callable(lr) else None
        cache.group = group
        if isinstance(group, ParamGroup):
            group.edited = False

    # -- structure ----------------------------------------------------------------------
    @staticmethod
    def _parse_groups(params) -> list[tuple[list, dict]]:
        if _backend.is_array(params):
            return [([params], {})]
        if isinstance(params, dict):
            raise TypeError("params must be an array, a sequence of arrays or a sequence of group dicts, not a dict")
        try:
            items = list(params)
        except TypeError:
            raise TypeError(f"params must be an array or a sequence, got {type(params).__name__}") from None
        if items and all(isinstance(it, dict) for it in items):
            groups = []
            for gi, g in enumerate(items):
                if "params" not in g:
                    raise ValueError(f"param group {gi} has no 'params' entry")
                arrays = g["params"]
                arrays = [arrays] if _backend.is_array(arrays) else list(arrays)
                groups.append((arrays, {k: v for k, v in g.items() if k != "params"}))
            return groups
        if any(isinstance(it, dict) for it in items):
            raise TypeError("params mixes group dicts and arrays; use group dicts for all")
        return [(items, {})]

    def _match_grads(self, grads) -> list:
        """Gradients aligned with ``self._slots``: one array, a flat sequence, or one sequence per group."""
        n = len(self._slots)
        if grads is None or _backend.is_array(grads):
            if n != 1:
                raise TypeError(f"step() got one gradient array for {n} parameters; pass a sequence of {n}")
            flat = [grads]
        else:
            try:
                flat = list(grads)
            except TypeError:
                raise TypeError(f"step() takes a sequence of gradients, got {type(grads).__name__}") from None
            if len(self._group_slots) > 1 and len(flat) == len(self._group_slots) and all(
                isinstance(g, (list, tuple)) for g in flat
            ):
                nested = flat
                flat = []
                for gi, (gg, slots) in enumerate(zip(nested, self._group_slots)):
                    if len(gg) != len(slots):
                        raise ValueError(f"step() got {len(gg)} gradients for param group {gi}, "
                                         f"which has {len(slots)} parameters")
                    flat.extend(gg)
            if len(flat) != n:
                raise ValueError(f"step() got {len(flat)} gradients for {n} parameters")
        prepare = self._backend.grad  # checks, and the flat view the kernel reads
        return [None if g is None else prepare(g, slot.param, slot.index)
                for slot, g in zip(self._slots, flat)]

    # -- the step -----------------------------------------------------------------------
    @_locking.synchronized  # one thread at a time per optimizer (fastopt._locking)
    def step(self, grads) -> None:
        """Update every parameter in place from its gradient; ``None`` skips a parameter.

        ``grads`` has the structure of ``params``: one array, a sequence with one array per
        parameter (in group order), or one sequence per param group. Everything is checked
        before any parameter or state buffer changes. With ``skip_nonfinite`` a step whose
        gradients hold NaN or inf returns without changing anything but the skip counters.
        """
        if self._flat is not None:
            return self._flat.step(grads)
        grads = self._match_grads(grads)
        hps = [self._resolve(gi) for gi in range(len(self.param_groups))]
        scale, noise = 1.0, None
        if self.transforms.active:
            begun = self.transforms.begin_step(self, grads)
            if begun is None:
                return
            scale, noise = begun
        plan = self.kernel.plan
        for slot, g in zip(self._slots, grads):
            if g is None:
                continue
            hp = hps[slot.group]
            rule, scalars = plan(hp, slot.step + 1, slot.host)
            if rule.state and rule.state[-1] not in slot.buffers:  # an option was switched on
                slot.ensure_buffers(self.kernel.buffers(hp))
            table = slot.table
            table[0, 0] = -scale if hp["maximize"] else scale
            table[0, 1 : len(scalars) + 1] = scalars
            if noise is None:
                slot.run(rule, g)
            else:
                noise.run(slot, rule, g, -1.0 if hp["maximize"] else 1.0)
            slot.step += 1
        self._step_count += 1

    @property
    def step_count(self) -> int:
        """Completed calls of :meth:`step` (what an ``lr`` schedule is called with)."""
        return self._step_count

    @property
    def state(self) -> list[dict]:
        """Per-parameter state, in parameter order: ``step``, the host scalars and the live
        state buffers (views the optimizer updates; copy them to keep a snapshot).
        Over a FlatParams: a dict keyed by tensor name."""
        if self._flat is not None:
            return self._flat.state()
        return [{"step": s.step, **s.host, **s.buffers} for s in self._slots]

    # -- saving and loading -------------------------------------------------------------
    @_locking.synchronized  # one thread at a time per optimizer (fastopt._locking)
    def state_dict(self) -> dict:
        """A plain dict of NumPy arrays and numbers: hyper-parameters, steps and copies of
        every state buffer, keyed by parameter position (torch's layout). A callable ``lr``
        is saved as ``None``. Over a FlatParams, keyed by tensor name."""
        if self._flat is not None:
            return self._flat.state_dict()
        groups = []
        for group, slots in zip(self.param_groups, self._group_slots):
            g = {k: (None if k == "lr" and callable(v) else v) for k, v in group.items() if k != "params"}
            g["params"] = [s.index for s in slots]
            groups.append(g)
        state = {
            s.index: {"step": s.step, **s.host, **{k: self._backend.to_host(b) for k, b in s.buffers.items()}}
            for s in self._slots
        }
        return {"optimizer": type(self).__name__, "format": STATE_FORMAT, "step_count": self._step_count,
                "param_groups": groups, "state": state}

    @_locking.synchronized  # one thread at a time per optimizer (fastopt._locking)
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore hyper-parameters, steps and state buffers saved by :meth:`state_dict`.

        The dict is checked whole (optimizer type, groups, parameter count, buffer names,
        shapes and dtypes) before anything changes, so a bad dict leaves the optimizer as it
        was. Buffers are copied into the existing arrays.
        """
        if self._flat is not None:
            return self._flat.load_state_dict(state_dict)
        plan = self._check_state_dict(state_dict)
        for gi, new_group in plan["groups"]:
            self.param_groups[gi].update(new_group)
        for slot, step, host, buffers in plan["slots"]:
            slot.step = step
            slot.host = host
            slot.ensure_buffers({k: 0.0 for k in buffers})
            for name, value in buffers.items():
                self._backend.copy_in(slot.buffers[name], value)
        self._step_count = plan["step_count"]

    def _check_state_dict(self, sd) -> dict:
        if not isinstance(sd, dict):
            raise TypeError(f"state_dict must be a dict, got {type(sd).__name__}")
        name = type(self).__name__
        if sd.get("optimizer") != name:
            raise ValueError(f"state_dict is from optimizer {sd.get('optimizer')!r}, not {name!r}")
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(f"state_dict has format {sd.get('format')!r}; this fastopt reads format {STATE_FORMAT}")
        groups = sd.get("param_groups")
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            raise ValueError(f"state_dict has {len(groups) if isinstance(groups, (list, tuple)) else 'no'} "
                             f"param groups; this optimizer has {len(self.param_groups)}")
        plan_groups, hps = [], []
        for gi, (g, slots) in enumerate(zip(groups, self._group_slots)):
            if list(g.get("params", ())) != [s.index for s in slots]:
                raise ValueError(f"state_dict param group {gi} holds parameters {g.get('params')}, "
                                 f"this optimizer's holds {[s.index for s in slots]}")
            new = {k: v for k, v in g.items() if k != "params"}
            if set(new) != set(self.kernel.CHECKS):
                raise ValueError(f"state_dict param group {gi} has options {sorted(new)}, "
                                 f"expected {sorted(self.kernel.CHECKS)}")
            if new["lr"] is None:
                new["lr"] = self.param_groups[gi]["lr"]
            hp = self._check_hyper(new, f"state_dict param group {gi}: ")
            plan_groups.append((gi, new))
            hps.append(hp)
        state = sd.get("state")
        if not isinstance(state, dict) or len(state) != len(self._slots):
            raise ValueError(f"state_dict has state for {len(state) if isinstance(state, dict) else 'no'} "
                             f"parameters; this optimizer has {len(self._slots)}")
        host_names = set(getattr(self.kernel, "host_state", dict)())
        plan_slots = []
        for slot in self._slots:
            entry = state.get(slot.index, state.get(str(slot.index)))
            if not isinstance(entry, dict):
                raise ValueError(f"state_dict has no state for parameter {slot.index}")
            step = entry.get("step")
            if isinstance(step, np.ndarray) and step.ndim == 0:
                step = step.item()
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"state_dict parameter {slot.index}: step must be an integer >= 0, got {step!r}")
            expected = set(self.kernel.buffers(hps[slot.group]))
            buffers = {k: v for k, v in entry.items() if k != "step" and k not in host_names}
            if set(buffers) != expected:
                raise ValueError(f"state_dict parameter {slot.index} has state {sorted(buffers)}, "
                                 f"expected {sorted(expected)} (is it from another optimizer or other options?)")
            for k, v in buffers.items():
                if not isinstance(v, np.ndarray):
                    raise TypeError(f"state_dict parameter {slot.index}: {k} must be a NumPy array, "
                                    f"got {type(v).__name__}")
                if v.shape != slot.shape:
                    raise ValueError(f"state_dict parameter {slot.index}: {k} has shape {v.shape}, "
                                     f"the parameter has shape {slot.shape}")
                if v.dtype != slot.dtype:
                    raise TypeError(f"state_dict parameter {slot.index}: {k} has dtype {v.dtype}, "
                                    f"the parameter has dtype {slot.dtype}")
            host = {k: (v.item() if isinstance(v, np.ndarray) else v) for k, v in entry.items() if k in host_names}
            for k, v in host.items():
                if not isinstance(v, numbers.Real) or not math.isfinite(v):
                    raise ValueError(f"state_dict parameter {slot.index}: {k} must be a finite number, got {v!r}")
            plan_slots.append((slot, int(step), {**getattr(self.kernel, "host_state", dict)(), **host}, buffers))
        step_count = sd.get("step_count", 0)
        if isinstance(step_count, np.ndarray):
            step_count = step_count.item()
        if isinstance(step_count, bool) or not isinstance(step_count, numbers.Integral) or step_count < 0:
            raise ValueError(f"state_dict step_count must be an integer >= 0, got {step_count!r}")
        return {"groups": plan_groups, "slots": plan_slots, "step_count": int(step_count)}

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for gi, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {gi}")
            lines.extend(f"    {k}: {v}" for k, v in g.items() if k != "params")
        return "\n".join(lines + [")"])
