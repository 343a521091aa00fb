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

from . import _backend, _locking, _validation
from ._flat_engine import FlatEngine, is_flat
from .kernels import _build
from .kernels import _hyper as H
from .transforms import GradTransforms

STATE_FORMAT = 1
#: The largest step count a state dict may hold (float64 counts every integer up to it).
MAX_STEP = 2**53


class _Slot:
    """One parameter and everything its update needs, allocated once."""

    __slots__ = ("param", "flat", "buffers", "flat_buffers", "host", "step", "table", "bounds",
                 "group", "index", "_args_rule", "_args", "backend", "shape", "dtype", "limit")

    def __init__(self, param, group: int, index: int, ncols: int, backend=_backend.HOST):
        self.param = param
        self.backend = backend
        self.shape, self.dtype = backend.shape_dtype(param)
        self.limit = H.largest(self.dtype)  # the largest finite scalar the kernel can read
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

    def sync_buffers(self, needed: dict[str, float], kernel) -> None:
        """Make the state buffers exactly ``needed`` (name -> initial value): an option
        switched on gets its buffer at its initial value, one switched off loses its buffer
        (and the rule may reset host scalars that went with it, ``kernel.discard``)."""
        dropped = [name for name in self.buffers if name not in needed]
        for name in dropped:
            del self.buffers[name]
            del self.flat_buffers[name]
        if dropped and hasattr(kernel, "discard"):
            self.host = kernel.discard(self.host, dropped)
        self.ensure_buffers(needed)
        self._args_rule = None

    def run(self, rule: _build.Rule, grad) -> None:
        """One fused update of this parameter by ``rule`` from the flat gradient ``grad``
        (the launcher and the state arguments are cached per rule)."""
        if rule is not self._args_rule:
            launch = self.backend.launcher(rule, int(self.bounds[-1]))
            self._args = (launch, tuple(self.flat_buffers[name] for name in rule.state))
            self._args_rule = rule
        launch, states = self._args
        launch(self.flat, grad, states, self.bounds, self.table)


class _GroupCache:
    """What a param group held when it was last validated, and the hyper-parameters the
    kernels read.

    A step compares the group with this snapshot before using ``hp`` (``_same``): a shallow
    copy of the group (``group == copy`` compares keys and values, identity first, so any
    assignment, ``|=``, ``update``, ``del`` or a replaced dict shows), the contents of list
    values (``betas`` edited in place) and the identities of the arrays in ``params``. Any
    difference runs the full validation again.
    """

    __slots__ = ("group", "hp", "items", "lists", "param_ids", "params", "schedule")

    def __init__(self):
        self.group = None
        self.items: dict = {}
        self.lists: tuple = ()
        self.params = None
        self.param_ids: tuple | None = None
        self.hp: dict = {}
        self.schedule = None


def _same(group, cache: _GroupCache) -> bool:
    """Whether ``group`` is exactly what ``cache`` validated (see :class:`_GroupCache`)."""
    if group is not cache.group:
        return False
    try:
        if group != cache.items:  # dict == dict: C lookups, identity first, no allocation
            return False
    except Exception:  # a value whose == is not a bool (an ndarray): changed
        return False
    if cache.param_ids is not None and tuple(map(id, group["params"])) != cache.param_ids:
        return False
    for key, snapshot in cache.lists:
        if tuple(group[key]) != snapshot:
            return False
    return True


def _snapshot(group: dict, cache: _GroupCache, hp: dict, checks) -> None:
    cache.group = group
    cache.hp = hp
    cache.items = dict(group)
    cache.lists = tuple((k, tuple(group[k])) for k in checks if isinstance(group[k], list))
    cache.params = params = group["params"]
    cache.param_ids = tuple(map(id, params)) if isinstance(params, list) else None
    lr = group["lr"]
    cache.schedule = lr if callable(lr) else None


#: Every option name of every fastopt optimizer and transform: a param group key that is one
#: of these but not an option of the group's optimizer is a mistake (``momentum`` for Adam)
#: and raises; any other extra key (``"name"``) is the user's, kept and never read.
def _all_options() -> frozenset:
    from .kernels import RULES

    names = {k for module in RULES.values() for k in module.CHECKS}
    return frozenset(names | {"clip_grad_norm", "skip_nonfinite", "grad_noise", "seed"})


_OPTIONS = _all_options()


def _replace_group(group: dict, new: dict) -> None:
    """Make ``group`` hold its ``params`` and the items of ``new`` (in place: same object)."""
    params = group["params"]
    group.clear()
    group["params"] = params
    group.update(new)


def _check_lr_value(value) -> float:
    return H.learning_rate("lr", value)




_checked_plan = H.checked_plan  # the flat engine and the sharded optimizer plan through it too


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

    Param groups
    ------------
    ``opt.param_groups`` is a list of plain dicts. Any edit of a group's options (assignment,
    ``|=``, ``update``, ``del``, a ``betas`` list edited in place, a group dict replaced by
    another holding the same arrays) takes effect at the next step, or that step raises
    ``TypeError``/``ValueError`` before anything changes: an invalid value, a missing option,
    another optimizer's option (``momentum`` for Adam), a fixed option changed (AdamW's
    ``decoupled_weight_decay``). Which arrays a group updates is fixed at construction:
    replacing or editing a group's ``"params"``, removing, adding or reordering groups makes
    the next step (and ``state_dict``) raise ``ValueError``; build a new optimizer instead.
    Other keys (``"name"``, anything that is no fastopt option) are the user's: kept, saved
    by ``state_dict`` and ``fastopt.save`` (which needs them JSON-able), never read.
    Switching an option off drops its state buffers; switching it on again starts them
    afresh at their initial values (torch would reuse the stale ones).

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
        self._caches: list[_GroupCache] = []
        names = []
        for gi, (arrays, overrides) in enumerate(groups):
            group = self._new_group(gi, list(arrays), overrides)
            slots = []
            for pi, p in enumerate(arrays):
                where = f"param group {gi}, parameter {pi}" if len(groups) > 1 else f"parameter {len(self._slots)}"
                backend.check_param(p, where)
                names.append(where)
                slot = _Slot(p, gi, len(self._slots), self._ncols, backend)
                self._slots.append(slot)
                slots.append(slot)
            self.param_groups.append(group)
            self._group_slots.append(slots)
        if not self._slots:
            raise ValueError("optimizer got an empty parameter list")
        backend.check_no_overlap([s.param for s in self._slots], names)
        self.transforms.bind([int(s.bounds[-1]) for s in self._slots])
        self._step_count = 0
        init_host = getattr(self.kernel, "host_state", dict)
        for gi, slots in enumerate(self._group_slots):
            hp = self._group_hp(gi)
            for slot in slots:
                slot.ensure_buffers(self.kernel.buffers(hp))
                slot.host = init_host()

    def _new_group(self, gi: int, params, overrides: dict) -> dict:
        """The param group dict of ``params`` with ``overrides`` over the defaults, checked
        (its validated hyper-parameters cached for the first step)."""
        group = {"params": params, **self.defaults, **overrides}
        self._caches.append(_GroupCache())
        self._validate_group(gi, group, self._caches[gi], params)
        return group

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

    def _hypers(self) -> list[dict]:
        """The validated hyper-parameters of every group for the coming step (a schedule's
        ``lr`` evaluated and checked). Raises, before anything changes, if a group was edited
        to an invalid value, lost an option, got another optimizer's option or a fixed option
        (``forced``) changed, or if the groups' structure changed: a group added, removed or
        replaced by one holding other parameters, or a group's ``params`` replaced or edited.
        """
        groups = self.param_groups
        caches = self._caches
        if type(groups) is not list or len(groups) != len(caches):
            self._check_structure()
        out = []
        for gi, group in enumerate(groups):
            cache = caches[gi]
            try:  # _same, inlined (a step's hot path): dict ==, then params and list values
                same = (group is cache.group and group == cache.items
                        and (cache.param_ids is None or tuple(map(id, group["params"])) == cache.param_ids))
            except Exception:
                same = False
            if not same or (cache.lists and not _same(group, cache)):
                self._validate_group(gi, group, cache, self._group_params(gi))
            hp = cache.hp
            if cache.schedule is not None:
                hp["lr"] = _check_lr_value(cache.schedule(self._step_count))
            out.append(hp)
        return out

    def _group_hp(self, gi: int) -> dict:
        """Group ``gi``'s validated hyper-parameters (a schedule's ``lr`` not evaluated)."""
        self._check_structure()
        group, cache = self.param_groups[gi], self._caches[gi]
        if not _same(group, cache):
            self._validate_group(gi, group, cache, self._group_params(gi))
        return cache.hp

    def _group_params(self, gi: int):
        """What group ``gi``'s ``"params"`` must hold: its arrays in order (over a FlatParams,
        its selection)."""
        if self._flat is not None:
            return self._flat.selections[gi]
        return [s.param for s in self._group_slots[gi]]

    def _check_structure(self) -> None:
        groups = self.param_groups
        if not isinstance(groups, list):
            raise TypeError(f"opt.param_groups must be a list of dicts, got {type(groups).__name__}")
        if len(groups) != len(self._caches):
            raise ValueError(f"opt.param_groups has {len(groups)} groups but this optimizer was built with "
                             f"{len(self._caches)}; fastopt does not add or remove param groups after "
                             "construction (build a new optimizer over the new groups)")

    def _validate_group(self, gi: int, group, cache: _GroupCache, params) -> None:
        """Check group ``gi`` whole (structure, keys, values) and cache the result; on error
        the cache keeps the last valid state."""
        where = f"param group {gi}"
        if not isinstance(group, dict):
            raise TypeError(f"opt.param_groups[{gi}] must be a dict, got {type(group).__name__}")
        if "params" not in group:
            raise ValueError(f"{where} has no 'params' entry")
        self._check_group_params(gi, group["params"], params)
        checks = self.kernel.CHECKS
        missing = [k for k in checks if k not in group]
        if missing:
            raise ValueError(f"{where} has no {missing[0]!r} entry")
        foreign = sorted(k for k in group if k in _OPTIONS and k not in checks)
        if foreign:
            raise TypeError(f"{where} has unknown option(s) {', '.join(foreign)} "
                            f"({type(self).__name__} does not take them)")
        hp = self._check_hyper({k: group[k] for k in checks}, f"{where}: ")
        for k, v in self.forced.items():
            if hp[k] != v:
                raise ValueError(f"{where}: {type(self).__name__} always has {k}={v!r}, got {group[k]!r}")
        _snapshot(group, cache, hp, checks)

    def _check_group_params(self, gi: int, value, expected) -> None:
        """A group's ``params`` must still be the arrays it was built with, in order."""
        if not isinstance(expected, list):  # a FlatSelection: the same buffer and names
            same = value is expected or (type(value) is type(expected) and value.flat is expected.flat
                                         and value.names == expected.names)
        else:
            same = (isinstance(value, (list, tuple)) and len(value) == len(expected)
                    and all(a is b for a, b in zip(value, expected)))
        if not same:
            raise ValueError(f"param group {gi}'s 'params' no longer holds the arrays it was built with; "
                             "fastopt does not change which arrays a group updates after construction "
                             "(build a new optimizer)")

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
        parameter (in group order), or one sequence per param group.

        The step is all or nothing. Everything is checked first: every gradient, every
        group's hyper-parameters and structure (see ``param_groups`` edits in the class
        doc), that every parameter is still writable, and every parameter's update scalars
        (``plan``: bias corrections, schedule values, host state such as NAdam's
        ``mu_product``), which must be finite in the parameter's dtype. Any failure raises
        ``TypeError``/``ValueError`` before any parameter, state buffer, host scalar or
        counter changes. With ``skip_nonfinite`` a step whose gradients hold NaN or inf
        returns without changing anything but the skip counters.
        """
        if self._flat is not None:
            return self._flat.step(grads)
        grads = self._match_grads(grads)
        hps = self._hypers()
        plan = self.kernel.plan
        work = []
        last = None  # slots of one group at one step with equal host state share one plan
        on_host = self._backend is _backend.HOST  # GPU arrays have no read-only flag
        for slot, g in zip(self._slots, grads):
            if g is None:
                continue
            if on_host and not slot.param.flags.writeable:
                raise ValueError(f"parameter {slot.index} was made read-only after the optimizer was built; "
                                 "fastopt updates parameters in place")
            hp = hps[slot.group]
            step = slot.step + 1
            host = slot.host
            if last is not None and last[0] is hp and last[1] == step and last[2] == host and last[6] is slot.dtype:
                work.append((slot, g, hp, last[3], last[4], last[5]))
                continue
            new_host = dict(host)
            try:
                rule, scalars = plan(hp, step, new_host)
            except (ArithmeticError, ValueError):  # OverflowError, ZeroDivisionError, math domain
                rule, scalars = _checked_plan(plan, hp, step, dict(host), slot.dtype, slot.index)  # the message
            limit = slot.limit
            for x in scalars:
                if not -limit <= x <= limit:  # non-finite in the dtype the kernel reads: the message
                    _checked_plan(plan, hp, step, dict(host), slot.dtype, slot.index)
            last = (hp, step, host, rule, scalars, new_host, slot.dtype)
            work.append((slot, g, hp, rule, scalars, new_host))
        scale, noise = 1.0, None
        if self.transforms.active:
            begun = self.transforms.begin_step(self, grads)
            if begun is None:
                return
            scale, noise = begun
        buffers = self.kernel.buffers
        for slot, g, hp, rule, scalars, new_host in work:
            if rule is not slot._args_rule:  # a variant change: an option was switched on or off
                slot.sync_buffers(buffers(hp), self.kernel)
            table = slot.table
            table[0, 0] = -scale if hp["maximize"] else scale
            table[0, 1 : len(scalars) + 1] = scalars
            if noise is None:
                slot.run(rule, g)
            else:
                noise.run(slot, rule, g, -1.0 if hp["maximize"] else 1.0)
            slot.step += 1
            slot.host = new_host
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
        is saved as ``None``. Over a FlatParams, keyed by tensor name.

        The groups are validated first (as at a step: an invalid edit raises) and each
        parameter's state is made what the current options need, so the dict always loads
        into an optimizer like this one: an option switched on since the last step gets its
        buffers at their initial values, one switched off loses them. A group's own keys
        (``"name"``, anything that is no optimizer's option) are saved as they are."""
        if self._flat is not None:
            return self._flat.state_dict()
        buffers = self.kernel.buffers
        for gi, slots in enumerate(self._group_slots):
            needed = buffers(self._group_hp(gi))
            for slot in slots:
                if slot.buffers.keys() != needed.keys():
                    slot.sync_buffers(needed, self.kernel)
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
        was. Buffers are copied into the existing arrays; the state ends up holding exactly
        the dict's buffers. Each group becomes the dict's group (its own keys included, the
        current ``lr`` kept where the dict has ``None``); the group dicts stay the same
        objects. A fixed option (AdamW's ``decoupled_weight_decay=True``) must match.
        """
        if self._flat is not None:
            return self._flat.load_state_dict(state_dict)
        plan = self._check_state_dict(state_dict)
        for gi, new_group in plan["groups"]:
            _replace_group(self.param_groups[gi], new_group)
        for slot, step, host, buffers in plan["slots"]:
            slot.sync_buffers(dict.fromkeys(buffers, 0.0), self.kernel)
            slot.step = step
            slot.host = host
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
        self._check_structure()
        checks = self.kernel.CHECKS
        plan_groups, hps = [], []
        for gi, (g, slots) in enumerate(zip(groups, self._group_slots)):
            if not isinstance(g, dict):
                raise TypeError(f"state_dict param group {gi} must be a dict, got {type(g).__name__}")
            if list(g.get("params", ())) != [s.index for s in slots]:
                raise ValueError(f"state_dict param group {gi} holds parameters {g.get('params')}, "
                                 f"this optimizer's holds {[s.index for s in slots]}")
            new = {k: v for k, v in g.items() if k != "params"}
            foreign = {k for k in new if k in _OPTIONS and k not in checks}
            if not set(new) >= set(checks) or foreign:
                raise ValueError(f"state_dict param group {gi} has options {sorted(k for k in new if k in _OPTIONS)}, "
                                 f"expected {sorted(checks)}")
            if new["lr"] is None:
                new["lr"] = self.param_groups[gi]["lr"]
            hp = self._check_hyper({k: new[k] for k in checks}, f"state_dict param group {gi}: ")
            for k, v in self.forced.items():
                if hp[k] != v:
                    raise ValueError(f"state_dict param group {gi}: {type(self).__name__} always has {k}={v!r}, "
                                     f"got {new[k]!r}")
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
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or not 0 <= step <= MAX_STEP:
                raise ValueError(f"state_dict parameter {slot.index}: step must be an integer in [0, 2**53], "
                                 f"got {step!r}")
            expected = set(self.kernel.buffers(hps[slot.group]))
            buffers = {k: v for k, v in entry.items() if k != "step" and k not in host_names}
            if set(buffers) != expected:
                raise ValueError(f"state_dict parameter {slot.index} has state {sorted(buffers)}, "
                                 f"expected {sorted(expected)} (is it from another optimizer or other options?)")
            for k, v in buffers.items():
                if not isinstance(v, np.ndarray):
                    raise TypeError(f"state_dict parameter {slot.index}: {k} must be a NumPy array, "
                                    f"got {type(v).__name__}")
                _validation.check_array_type(v, f"state_dict parameter {slot.index}: {k}")
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
            host = {**getattr(self.kernel, "host_state", dict)(), **host}
            check_host = getattr(self.kernel, "check_host", None)
            if check_host is not None:
                try:
                    host = check_host(host)
                except (TypeError, ValueError) as exc:
                    raise type(exc)(f"state_dict parameter {slot.index}: {exc}") from None
            plan_slots.append((slot, int(step), host, buffers))
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
