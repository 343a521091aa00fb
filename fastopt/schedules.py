r"""Learning-rate schedules: plain functions that return a callable ``n -> lr``.

``n = 0, 1, 2, ...`` counts *completed* steps, so ``schedule(0)`` is the learning rate of the
first update. Any schedule is a valid ``lr`` for every optimizer, which calls it with
``opt.step_count`` before each step::

    import fastopt as fo
    from fastopt import schedules
    opt = fo.SGD(w, lr=schedules.warmup_cosine(0.1, warmup_steps=500, total_steps=10_000))

Every function checks its arguments when it is called (``ValueError`` for a negative rate, a
warm-up longer than the run, milestones out of order, ...), so a bad schedule fails where it
is written, not thousands of steps later. Where ``torch.optim.lr_scheduler`` has the same
schedule, ``schedule(n)`` equals ``scheduler.get_last_lr()[0]`` after ``n`` calls of
``scheduler.step()`` (up to the rounding of torch's recursive forms); the docstrings name the
torch class. :class:`ReduceLROnPlateau` is the one schedule driven by a metric instead of
the step count.
"""

from __future__ import annotations

import bisect
import itertools
import math
import numbers
from collections.abc import Callable, Sequence

__all__ = [
    "ReduceLROnPlateau",
    "Schedule",
    "constant",
    "cosine",
    "cosine_restarts",
    "exponential",
    "inverse_time",
    "linear_warmup",
    "multistep",
    "one_cycle",
    "polynomial",
    "sequence",
    "step_decay",
    "time_based",
    "warmup_cosine",
]


# -- argument checks ----------------------------------------------------------------------------
def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _nonneg(name: str, value) -> float:
    value = _real(name, value)
    if value < 0.0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _positive(name: str, value) -> float:
    value = _real(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _step(n) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"a schedule is called with the number of completed steps (an integer), got {n!r}")
    if n < 0:
        raise ValueError(f"the step count must be >= 0, got {n}")
    return int(n)


def _fmt(value) -> str:
    return repr(value) if not isinstance(value, float) else f"{value:g}"


class Schedule:
    """A learning-rate schedule: ``schedule(n)`` is the rate of step ``n + 1`` as a float.

    Built by the functions of this module; ``n`` (completed steps) must be an integer >= 0.
    The ``repr`` names the function and its arguments.
    """

    __slots__ = ("_description", "_fn")

    def __init__(self, fn: Callable[[int], float], description: str):
        self._fn = fn
        self._description = description

    def __call__(self, n: int) -> float:
        return float(self._fn(_step(n)))

    def __repr__(self) -> str:
        return self._description


def _schedule(name: str, fn: Callable[[int], float], **args) -> Schedule:
    return Schedule(fn, f"{name}({', '.join(f'{k}={_fmt(v)}' for k, v in args.items())})")


# -- closed-form schedules ----------------------------------------------------------------------
def constant(lr: float) -> Schedule:
    r""":math:`\eta_n = \eta_0`."""
    lr = _nonneg("lr", lr)
    return _schedule("constant", lambda n: lr, lr=lr)


def inverse_time(lr: float, decay: float) -> Schedule:
    r"""Inverse-time decay, :math:`\eta_n = \eta_0 / (1 + d\,n)`.

    The form of ``torch.optim.Adagrad``'s ``lr_decay`` and of Keras' ``decay``
    (``fo.Adagrad(p, lr=inverse_time(lr, d))`` equals ``fo.Adagrad(p, lr=lr, lr_decay=d)``).
    """
    lr, decay = _nonneg("lr", lr), _nonneg("decay", decay)
    return _schedule("inverse_time", lambda n: lr / (1.0 + decay * n), lr=lr, decay=decay)


def time_based(lr: float, decay: float) -> Schedule:
    r"""Seed 003's time-based decay, the recursion :math:`\eta_{n+1} = \eta_n / (1 + d\,n)`.

    With :math:`\eta_0` = ``lr``, so :math:`\eta_n = \eta_0 / \prod_{k=0}^{n-1} (1 + d\,k)`
    (:math:`\eta_1 = \eta_0`; the rate then falls faster than any inverse-time decay). The
    recursion is evaluated as written, step by step; consecutive calls (what an optimizer
    makes) cost O(1), a jump back to an earlier ``n`` restarts it from zero.
    """
    lr, decay = _nonneg("lr", lr), _nonneg("decay", decay)
    cache = [0, lr]  # (n, eta_n) of the last call

    def fn(n: int) -> float:
        k, eta = cache
        if n < k:
            k, eta = 0, lr
        while k < n:
            eta = eta / (1.0 + decay * k)
            k += 1
        cache[0], cache[1] = k, eta
        return eta

    return _schedule("time_based", fn, lr=lr, decay=decay)


def step_decay(lr: float, decay: float, drop_every: int, *, offset: int = 1) -> Schedule:
    r"""Step decay, :math:`\eta_n = \eta_0\, d^{\lfloor (n + \text{offset}) / r \rfloor}`.

    The default ``offset=1`` is seed 003's formula :math:`\eta_0 d^{\lfloor (1 + n) / r \rfloor}`
    (the first drop comes after :math:`r - 1` steps); ``offset=0`` is
    ``torch.optim.lr_scheduler.StepLR(step_size=r, gamma=d)`` (first drop after :math:`r`).

    Parameters
    ----------
    lr : the initial rate :math:`\eta_0`
    decay : the factor :math:`d` applied at each drop (0.5 halves the rate)
    drop_every : :math:`r`, steps between drops (>= 1)
    offset : steps added to :math:`n` before dividing (>= 0)
    """
    lr, decay = _nonneg("lr", lr), _nonneg("decay", decay)
    drop_every, offset = _int("drop_every", drop_every, 1), _int("offset", offset, 0)
    return _schedule("step_decay", lambda n: lr * decay ** ((n + offset) // drop_every),
                     lr=lr, decay=decay, drop_every=drop_every, offset=offset)


def multistep(lr: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    r""":math:`\eta_n = \eta_0\, \gamma^{\#\{m \in \text{milestones} : m \le n\}}`.

    ``torch.optim.lr_scheduler.MultiStepLR(milestones, gamma)``. Milestones are step counts
    in non-decreasing order (a repeated milestone decays twice, as in torch).
    """
    lr, gamma = _nonneg("lr", lr), _nonneg("gamma", gamma)
    marks = [_int(f"milestones[{i}]", m, 0) for i, m in enumerate(milestones)]
    if marks != sorted(marks):
        raise ValueError(f"milestones must be in non-decreasing order, got {marks}")
    return _schedule("multistep", lambda n: lr * gamma ** bisect.bisect_right(marks, n),
                     lr=lr, milestones=marks, gamma=gamma)


def exponential(lr: float, decay: float) -> Schedule:
    r"""Seed 003's exponential decay, :math:`\eta_n = \eta_0\, e^{-d\,n}`.

    ``torch.optim.lr_scheduler.ExponentialLR(gamma)`` is ``exponential(lr, -log(gamma))``.
    A negative ``decay`` grows the rate (a learning-rate range test).
    """
    lr, decay = _nonneg("lr", lr), _real("decay", decay)
    return _schedule("exponential", lambda n: lr * math.exp(-decay * n), lr=lr, decay=decay)


def _cosine(lr: float, final_lr: float, n: int, total: int) -> float:
    return final_lr + (lr - final_lr) * (1.0 + math.cos(math.pi * n / total)) / 2.0


def cosine(lr: float, total_steps: int, *, final_lr: float = 0.0) -> Schedule:
    r"""Cosine annealing (Loshchilov & Hutter, 2017), then constant.

    .. math::

        \eta_n = \eta_\min + \tfrac12 (\eta_0 - \eta_\min)\,(1 + \cos(\pi \min(n, T) / T))

    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T, eta_min=final_lr)`` for
    :math:`n \le T`; after :math:`T` torch's curve climbs again, this one stays at
    :math:`\eta_\min` (use :func:`cosine_restarts` for cycles).
    """
    lr, final_lr = _nonneg("lr", lr), _nonneg("final_lr", final_lr)
    total_steps = _int("total_steps", total_steps, 1)
    return _schedule("cosine", lambda n: _cosine(lr, final_lr, min(n, total_steps), total_steps),
                     lr=lr, total_steps=total_steps, final_lr=final_lr)


def cosine_restarts(lr: float, period: int, *, mult: int = 1, final_lr: float = 0.0) -> Schedule:
    r"""Cosine annealing with warm restarts (SGDR, Loshchilov & Hutter, 2017).

    Cycle :math:`i` lasts :math:`T_i = T_0\, \text{mult}^i` steps; with :math:`t` the steps
    since the last restart,
    :math:`\eta_n = \eta_\min + \tfrac12 (\eta_0 - \eta_\min)(1 + \cos(\pi t / T_i))`.
    ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(T_0=period, T_mult=mult,
    eta_min=final_lr)``.
    """
    lr, final_lr = _nonneg("lr", lr), _nonneg("final_lr", final_lr)
    period, mult = _int("period", period, 1), _int("mult", mult, 1)

    def fn(n: int) -> float:
        if mult == 1:
            return _cosine(lr, final_lr, n % period, period)
        start, length = 0, period
        while n >= start + length:
            start, length = start + length, length * mult
        return _cosine(lr, final_lr, n - start, length)

    return _schedule("cosine_restarts", fn, lr=lr, period=period, mult=mult, final_lr=final_lr)


def linear_warmup(lr: float, warmup_steps: int, *, start_lr: float = 0.0) -> Schedule:
    r"""Linear warm-up from ``start_lr`` to ``lr`` over ``warmup_steps`` steps, then constant.

    .. math:: \eta_n = \eta_s + (\eta_0 - \eta_s) \min(n, W) / W

    ``torch.optim.lr_scheduler.LinearLR(start_factor=start_lr / lr, total_iters=W)``.
    ``warmup_steps=0`` is :func:`constant`.
    """
    lr, start_lr = _nonneg("lr", lr), _nonneg("start_lr", start_lr)
    warmup_steps = _int("warmup_steps", warmup_steps, 0)
    if warmup_steps == 0:
        return _schedule("linear_warmup", lambda n: lr, lr=lr, warmup_steps=0, start_lr=start_lr)
    return _schedule("linear_warmup",
                     lambda n: start_lr + (lr - start_lr) * min(n, warmup_steps) / warmup_steps,
                     lr=lr, warmup_steps=warmup_steps, start_lr=start_lr)


def warmup_cosine(lr: float, warmup_steps: int, total_steps: int, *, start_lr: float = 0.0,
                  final_lr: float = 0.0) -> Schedule:
    r"""Linear warm-up to ``lr``, then cosine annealing to ``final_lr`` at ``total_steps``.

    .. math::

        \eta_n = \begin{cases}
            \eta_s + (\eta_0 - \eta_s)\, n / W & n < W \\
            \eta_\min + \tfrac12 (\eta_0 - \eta_\min)(1 + \cos(\pi (n - W) / (T - W))) & W \le n \le T \\
            \eta_\min & n > T \end{cases}

    torch: ``SequentialLR([LinearLR(start_factor, total_iters=W), CosineAnnealingLR(T - W,
    eta_min)], milestones=[W])``. ``warmup_steps`` must be shorter than ``total_steps``.
    """
    lr, start_lr, final_lr = _nonneg("lr", lr), _nonneg("start_lr", start_lr), _nonneg("final_lr", final_lr)
    warmup_steps = _int("warmup_steps", warmup_steps, 0)
    total_steps = _int("total_steps", total_steps, 1)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps ({warmup_steps}) must be less than total_steps ({total_steps})")
    decay_steps = total_steps - warmup_steps

    def fn(n: int) -> float:
        if n < warmup_steps:
            return start_lr + (lr - start_lr) * n / warmup_steps
        return _cosine(lr, final_lr, min(n - warmup_steps, decay_steps), decay_steps)

    return _schedule("warmup_cosine", fn, lr=lr, warmup_steps=warmup_steps, total_steps=total_steps,
                     start_lr=start_lr, final_lr=final_lr)


def one_cycle(max_lr: float, total_steps: int, *, pct_start: float = 0.3, div_factor: float = 25.0,
              final_div_factor: float = 1e4, anneal: str = "cos", three_phase: bool = False) -> Schedule:
    r"""The 1cycle policy (Smith & Topin, 2019), as ``torch.optim.lr_scheduler.OneCycleLR``.

    From :math:`\eta_{\text{init}} = \eta_\max / \text{div\_factor}` up to :math:`\eta_\max` over
    the first ``pct_start`` of the run, then down to
    :math:`\eta_{\text{init}} / \text{final\_div\_factor}` at step ``total_steps - 1``
    (``three_phase``: back to :math:`\eta_{\text{init}}` first, symmetrically, then down).
    Each phase from :math:`a` to :math:`b` over fraction :math:`p` of it is
    :math:`b + \tfrac12 (a - b)(1 + \cos \pi p)` (``anneal="cos"``) or :math:`a + (b - a)p`
    (``"linear"``). Torch's phase boundaries are used as they are (phase 1 ends at step
    ``pct_start * total_steps - 1``). After ``total_steps - 1`` the rate stays at its final
    value (torch raises past ``total_steps``). Only the learning rate is scheduled, not momentum.
    """
    max_lr = _nonneg("max_lr", max_lr)
    total_steps = _int("total_steps", total_steps, 1)
    pct_start = _real("pct_start", pct_start)
    if not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"pct_start must be in [0, 1], got {pct_start}")
    div_factor, final_div_factor = _positive("div_factor", div_factor), _positive("final_div_factor", final_div_factor)
    if anneal not in ("cos", "linear"):
        raise ValueError(f"anneal must be 'cos' or 'linear', got {anneal!r}")
    initial = max_lr / div_factor
    final = initial / final_div_factor
    if three_phase:
        phases = [(pct_start * total_steps - 1, initial, max_lr),
                  (2 * pct_start * total_steps - 2, max_lr, initial),
                  (total_steps - 1, initial, final)]
    else:
        phases = [(pct_start * total_steps - 1, initial, max_lr), (total_steps - 1, max_lr, final)]
    ends = [0.0] + [end for end, _, _ in phases]
    if any(b <= a for a, b in itertools.pairwise(ends)):
        raise ValueError(f"one_cycle phases are empty with total_steps={total_steps}, pct_start={pct_start}"
                         f"{' and three_phase' if three_phase else ''}; each phase needs at least one step")

    def ramp(a: float, b: float, pct: float) -> float:
        if anneal == "cos":
            return b + (a - b) / 2.0 * (math.cos(math.pi * pct) + 1.0)
        return (b - a) * pct + a

    def fn(n: int) -> float:
        n = min(n, total_steps - 1)
        start = 0.0
        for i, (end, a, b) in enumerate(phases):
            if n <= end or i == len(phases) - 1:
                return ramp(a, b, (n - start) / (end - start))
            start = end
        raise AssertionError("unreachable")

    return _schedule("one_cycle", fn, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start,
                     div_factor=div_factor, final_div_factor=final_div_factor, anneal=anneal,
                     three_phase=three_phase)


def polynomial(lr: float, total_steps: int, *, power: float = 1.0, final_lr: float = 0.0) -> Schedule:
    r"""Polynomial decay, :math:`\eta_n = (\eta_0 - \eta_\min)(1 - \min(n, T)/T)^p + \eta_\min`.

    ``torch.optim.lr_scheduler.PolynomialLR(total_iters=T, power=p)`` for ``final_lr=0``.
    """
    lr, final_lr = _nonneg("lr", lr), _nonneg("final_lr", final_lr)
    total_steps = _int("total_steps", total_steps, 1)
    power = _nonneg("power", power)
    return _schedule("polynomial",
                     lambda n: (lr - final_lr) * (1.0 - min(n, total_steps) / total_steps) ** power + final_lr,
                     lr=lr, total_steps=total_steps, power=power, final_lr=final_lr)


def sequence(schedules: Sequence[Callable[[int], float]], boundaries: Sequence[int]) -> Schedule:
    r"""Join schedules: schedule :math:`i` runs from ``boundaries[i-1]`` to ``boundaries[i]``.

    .. math:: \eta_n = s_i(n - b_{i-1}) \quad \text{for } b_{i-1} \le n < b_i \ (b_{-1} = 0)

    Each schedule counts its own steps from zero (optax's ``join_schedules``), e.g. a warm-up
    then a cosine: ``sequence([linear_warmup(1e-3, 100), cosine(1e-3, 900)], [100])``.
    """
    schedules = list(schedules)
    if not schedules:
        raise ValueError("sequence needs at least one schedule")
    for i, s in enumerate(schedules):
        if not callable(s):
            raise TypeError(f"schedules[{i}] is not callable: {s!r}")
    bounds = [_int(f"boundaries[{i}]", b, 1) for i, b in enumerate(boundaries)]
    if len(bounds) != len(schedules) - 1:
        raise ValueError(f"{len(schedules)} schedules need {len(schedules) - 1} boundaries, got {len(bounds)}")
    if any(b <= a for a, b in itertools.pairwise(bounds)):
        raise ValueError(f"boundaries must be strictly increasing, got {bounds}")

    def fn(n: int) -> float:
        i = bisect.bisect_right(bounds, n)
        return schedules[i](n - (bounds[i - 1] if i else 0))

    return _schedule("sequence", fn, schedules=schedules, boundaries=bounds)


# -- metric-driven ------------------------------------------------------------------------------
class ReduceLROnPlateau:
    r"""Cut the learning rate by ``factor`` when a metric has stopped improving.

    Feed it the metric once per evaluation (``update(val_loss)``). An evaluation *improves*
    when, for ``mode="min"``, :math:`m < b\,(1 - \tau)` (``threshold_mode="rel"``) or
    :math:`m < b - \tau` (``"abs"``), :math:`b` the best so far and :math:`\tau` the
    ``threshold`` (mirrored for ``"max"``; NaN never improves). After more than ``patience``
    evaluations without improvement each rate becomes :math:`\max(\eta\cdot\text{factor},
    \eta_\min)` (unless that changes it by less than ``eps``), and the next ``cooldown``
    evaluations do not count. These are ``torch.optim.lr_scheduler.ReduceLROnPlateau``'s
    rules and numbers.

    It drives either

    - its own rate: ``plateau = ReduceLROnPlateau(1e-3)``, passed as an optimizer's
      ``lr=plateau`` (it is a callable ``n -> lr`` that returns the current rate), or
    - an optimizer: ``ReduceLROnPlateau(opt)`` edits ``opt.param_groups[i]["lr"]`` (each
      group's current float rate, like torch; ``min_lr`` may be one value per group).

    Parameters
    ----------
    target : float or Optimizer
    mode : ``"min"`` (a loss) or ``"max"`` (an accuracy)
    factor : float in (0, 1)
    patience : int >= 0, evaluations without improvement that are tolerated
    threshold : float >= 0
    threshold_mode : ``"rel"`` or ``"abs"``
    cooldown : int >= 0
    min_lr : float >= 0, or a sequence with one value per param group
    eps : float >= 0, smallest change of a rate that is applied

    Examples
    --------
    >>> plateau = ReduceLROnPlateau(0.1, patience=1)
    >>> [plateau.update(loss) for loss in (1.0, 0.5, 0.6, 0.7)]
    [False, False, False, True]
    >>> plateau.lr
    0.010000000000000002
    """

    def __init__(self, target, *, mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0,
                 min_lr: float | Sequence[float] = 0.0, eps: float = 1e-8):
        factor = _real("factor", factor)
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got {factor}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
        self.mode, self.threshold_mode = mode, threshold_mode
        self.factor = factor
        self.patience = _int("patience", patience, 0)
        self.threshold = _nonneg("threshold", threshold)
        self.cooldown = _int("cooldown", cooldown, 0)
        self.eps = _nonneg("eps", eps)
        if isinstance(target, numbers.Real) and not isinstance(target, bool):
            self.optimizer = None
            self._lr = _nonneg("lr", target)
            ngroups = 1
        elif hasattr(target, "param_groups"):
            self.optimizer = target
            ngroups = len(target.param_groups)
            for i, group in enumerate(target.param_groups):
                if callable(group["lr"]):
                    raise TypeError(f"param group {i} has a schedule as lr; ReduceLROnPlateau edits float rates "
                                    "(give it a float lr, or drive its own rate: lr=ReduceLROnPlateau(lr))")
        else:
            raise TypeError(f"ReduceLROnPlateau drives a float lr or an optimizer, got {type(target).__name__}")
        if isinstance(min_lr, (list, tuple)):
            if len(min_lr) != ngroups:
                raise ValueError(f"min_lr has {len(min_lr)} values for {ngroups} param groups")
            self.min_lrs = [_nonneg(f"min_lr[{i}]", v) for i, v in enumerate(min_lr)]
        else:
            self.min_lrs = [_nonneg("min_lr", min_lr)] * ngroups
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = 0
        self.cooldown_counter = 0
        self.num_updates = 0

    # -- the rate -------------------------------------------------------------------------
    @property
    def lr(self) -> float:
        """The current rate (the float form)."""
        if self.optimizer is not None:
            raise AttributeError("this ReduceLROnPlateau drives an optimizer; read opt.param_groups[i]['lr']")
        return self._lr

    def get_last_lr(self) -> list[float]:
        """The current rates, one per param group (torch's accessor)."""
        if self.optimizer is None:
            return [self._lr]
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def __call__(self, n: int) -> float:
        """The current rate, whatever ``n``: lets ``lr=plateau`` be an optimizer's schedule."""
        _step(n)
        return self.lr

    # -- the controller -------------------------------------------------------------------
    def _improves(self, metric: float) -> bool:
        best, tau = self.best, self.threshold
        if self.mode == "min":
            return metric < (best * (1.0 - tau) if self.threshold_mode == "rel" else best - tau)
        return metric > (best * (1.0 + tau) if self.threshold_mode == "rel" else best + tau)

    def update(self, metric: float) -> bool:
        """Record one evaluation of the metric; return whether the rate was reduced."""
        metric = float(metric)
        self.num_updates += 1
        if self._improves(metric):
            self.best = metric
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs <= self.patience:
            return False
        self.cooldown_counter = self.cooldown
        self.num_bad_epochs = 0
        return self._reduce()

    def _reduce(self) -> bool:
        changed = False
        if self.optimizer is None:
            new = max(self._lr * self.factor, self.min_lrs[0])
            if self._lr - new > self.eps:
                self._lr, changed = new, True
            return changed
        for i, group in enumerate(self.optimizer.param_groups):
            old = group["lr"]
            if callable(old):
                raise TypeError(f"param group {i} has a schedule as lr; ReduceLROnPlateau edits float rates")
            new = max(float(old) * self.factor, self.min_lrs[i])
            if old - new > self.eps:
                group["lr"], changed = new, True
        return changed

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Counters, best metric and (float form) the rate; not the optimizer."""
        state = {k: getattr(self, k) for k in ("best", "num_bad_epochs", "cooldown_counter", "num_updates")}
        if self.optimizer is None:
            state["lr"] = self._lr
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (checked whole before anything changes)."""
        keys = {"best", "num_bad_epochs", "cooldown_counter", "num_updates"}
        keys |= {"lr"} if self.optimizer is None else set()
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"ReduceLROnPlateau state must be a dict with keys {sorted(keys)}")
        best = float(state["best"])
        counters = {k: _int(k, state[k], 0) for k in ("num_bad_epochs", "cooldown_counter", "num_updates")}
        lr = _nonneg("lr", state["lr"]) if self.optimizer is None else None
        self.best = best
        for k, v in counters.items():
            setattr(self, k, v)
        if lr is not None:
            self._lr = lr

    def __repr__(self) -> str:
        target = f"lr={_fmt(self._lr)}" if self.optimizer is None else type(self.optimizer).__name__
        return (f"ReduceLROnPlateau({target}, mode={self.mode!r}, factor={_fmt(self.factor)}, "
                f"patience={self.patience}, best={_fmt(self.best)}, bad={self.num_bad_epochs})")
