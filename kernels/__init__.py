"""The fused update kernels, callable directly on flat buffers.

Each rule module (``adam``, ``sgd``, ...) holds one rule's math: element functions of
scalars, its defaults and checks, its state buffers, and ``plan`` (the float64 scalars of one
step). ``_build`` turns the element functions into CPU loops (and, in ``cuda``, GPU loops).

For users who manage their own buffers, every rule is also a function here, ``<rule>_step``::

    import numpy as np
    from fastopt import kernels
    p = np.zeros(1000, np.float32); g = np.ones_like(p)
    state = kernels.init_state("adam", p)            # {"exp_avg": ..., "exp_avg_sq": ...}
    kernels.adam_step(p, g, state, step=1, lr=1e-3)  # one fused pass, in place

``step`` is the 1-based number of this update (bias corrections depend on it); ``host``
carries rule scalars kept between steps (NAdam's ``mu_product``), created by
:func:`init_state` under the key ``"host"``.

These functions hold no lock (an optimizer does): buffers shared between threads are the
caller's to serialize. In a forked child they run as the optimizers do (``_threads``).
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from .. import _validation
from . import _threads

_threads.preload_tbb()  # before Numba picks its threading layer: TBB where the tbb package is installed

from . import _build, adadelta, adagrad, adam, adamax, nadam, radam, rmsprop, sgd  # noqa: E402
from ._build import Rule  # noqa: E402
from ._hyper import checked_plan, largest, nonneg  # noqa: E402

#: Rule name -> the module that holds its math.
RULES = {
    "sgd": sgd,
    "adagrad": adagrad,
    "adadelta": adadelta,
    "rmsprop": rmsprop,
    "adam": adam,
    "adamax": adamax,
    "nadam": nadam,
    "radam": radam,
}


def all_variants() -> list[Rule]:
    """Every compiled variant of every rule."""
    return [r for module in RULES.values() for r in module.RULES]


def _module(rule: str):
    try:
        return RULES[rule]
    except KeyError:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}") from None


def init_state(rule: str, param: np.ndarray, **hyper) -> dict:
    """Fresh state for one parameter: the rule's buffers (plain ``np.ndarray`` of the shape and
    dtype of ``param``, whatever its array type) and, under ``"host"``, its host scalars."""
    module = _module(rule)
    hp = {**module.DEFAULTS, **_build_hyper(module, hyper)}
    if not isinstance(param, np.ndarray):
        raise TypeError(f"param must be a NumPy array (float32 or float64), got {type(param).__name__}")
    _validation.check_array_type(param, "param")
    if param.dtype not in _validation.FLOAT_DTYPES:
        raise TypeError(f"param has dtype {param.dtype}; fastopt updates float32 and float64 arrays")
    state = {name: np.full_like(param, value, subok=False) for name, value in module.buffers(hp).items()}
    state["host"] = getattr(module, "host_state", dict)()
    return state


def _check_host(module, host) -> dict:
    """The host scalars of one step from ``state["host"]``: exactly the rule's entries (missing
    ones take their initial values), each of its initial value's kind (a bool, or a finite
    number), then the rule's own range checks (``check_host``)."""
    initial = getattr(module, "host_state", dict)()
    if host is None:
        return initial
    if not isinstance(host, dict):
        raise TypeError(f"state['host'] must be a dict, got {type(host).__name__}")
    unknown = sorted(map(repr, set(host) - set(initial)))
    if unknown:
        raise ValueError(f"state['host'] has unknown entries {', '.join(unknown)}; "
                         f"this rule keeps {sorted(initial) or 'none'}")
    checked = dict(initial)
    for name, value in host.items():
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()
        if isinstance(initial[name], bool):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"state['host'][{name!r}] must be a bool, got {value!r}")
            checked[name] = bool(value)
        else:
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real) \
                    or not math.isfinite(value):
                raise ValueError(f"state['host'][{name!r}] must be a finite number, got {value!r}")
            checked[name] = float(value)
    check = getattr(module, "check_host", None)
    if check is not None:
        checked = check(checked)
    return checked


def _build_hyper(module, hyper: dict) -> dict:
    from ._hyper import validate

    return validate(hyper, module.CHECKS)


def update(rule: str, param, grad, state: dict, *, step: int, grad_scale: float = 1.0, **hyper) -> None:
    """Apply update number ``step`` of ``rule`` to ``param`` in place, one fused pass.

    ``state`` maps buffer names to arrays like ``param`` (see :func:`init_state`); they are
    updated in place too. ``grad_scale`` (finite, >= 0) multiplies the gradient inside the
    kernel (a clip factor); ``maximize=True`` negates it. ``state["host"]`` holds exactly the
    rule's host scalars (:func:`init_state`), each finite and in range.

    All arguments are checked before anything changes: ``param``, ``grad`` and the state
    buffers must be ``np.ndarray`` or ``np.memmap`` (other subclasses, such as ``np.matrix``
    or masked arrays, are a TypeError), of the parameter's float dtype and shape,
    C-contiguous and not sharing memory; every per-step scalar must be finite in the
    parameter's dtype. The kernel reads and writes exactly ``param.size`` elements of each.
    """
    module = _module(rule)
    hp = {**module.DEFAULTS, **_build_hyper(module, hyper)}
    check = getattr(module, "check", None)
    if check is not None:
        check(hp)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (the number of this update), got {step!r}")
    grad_scale = nonneg("grad_scale", grad_scale)  # finite, >= 0 (maximize=True ascends)
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict of buffers (see init_state), got {type(state).__name__}")
    _validation.check_param(param, "param")
    _validation.check_grad(grad, param, "grad")
    host = _check_host(module, state.get("host"))
    selected, scalars = checked_plan(module.plan, hp, int(step), host, param.dtype, "param")
    buffers = []
    for name in selected.state:
        if name not in state:
            raise ValueError(f"state has no {name!r} buffer; {rule} with these options needs {list(selected.state)}")
        buf = state[name]
        _validation.check_param(buf, f"state[{name!r}]")
        if buf.shape != param.shape or buf.dtype != param.dtype:
            raise ValueError(f"state[{name!r}] has shape {buf.shape} and dtype {buf.dtype}; "
                             f"param has shape {param.shape} and dtype {param.dtype}")
        buffers.append(_validation.flat_view(buf, param.size))
    _validation.check_no_overlap([param, grad] + [state[n] for n in selected.state],
                                 ["param", "grad"] + [f"state[{n!r}]" for n in selected.state])
    if not grad_scale <= largest(param.dtype):  # the plan's scalars were checked by checked_plan
        raise ValueError(f"grad_scale {grad_scale!r} is not finite in {param.dtype}")
    table = np.empty((1, selected.ncols), dtype=param.dtype)
    table[0, 0] = -grad_scale if hp["maximize"] else grad_scale
    table[0, 1:] = scalars
    bounds = np.array([0, param.size], dtype=np.int64)
    _build.run_cpu(selected, _validation.flat_view(param, param.size), _validation.flat_view(grad, param.size),
                   buffers, bounds, table)
    if "host" in state:
        state["host"].update(host)


def _functional(rule: str):
    module = RULES[rule]

    @functools.wraps(update)
    def apply(param, grad, state, *, step, grad_scale=1.0, **hyper):
        return update(rule, param, grad, state, step=step, grad_scale=grad_scale, **hyper)

    apply.__name__ = apply.__qualname__ = f"{rule}_step"
    apply.__doc__ = (f"One fused ``{rule}`` update of ``param`` in place; see :func:`update`.\n\n"
                     f"Defaults: {module.DEFAULTS}\n\n{module.__doc__}")
    return apply


globals().update({f"{name}_step": _functional(name) for name in RULES})

__all__ = ["RULES", "Rule", "all_variants", "init_state", "update", *(f"{n}_step" for n in RULES)]
