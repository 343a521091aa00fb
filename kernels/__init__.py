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

import numpy as np

from .. import _validation
from . import _threads

_threads.preload_tbb()  # before Numba picks its threading layer: TBB where the tbb package is installed

from . import _build, adadelta, adagrad, adam, adamax, nadam, radam, rmsprop, sgd  # noqa: E402
from ._build import Rule  # noqa: E402

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
    """Fresh state for one parameter: the rule's buffers (same shape and dtype as ``param``)
    and, under ``"host"``, its host scalars."""
    module = _module(rule)
    hp = {**module.DEFAULTS, **_build_hyper(module, hyper)}
    state = {name: np.full_like(param, value) for name, value in module.buffers(hp).items()}
    state["host"] = getattr(module, "host_state", dict)()
    return state


def _build_hyper(module, hyper: dict) -> dict:
    from ._hyper import validate

    return validate(hyper, module.CHECKS)


def update(rule: str, param, grad, state: dict, *, step: int, grad_scale: float = 1.0, **hyper) -> None:
    """Apply update number ``step`` of ``rule`` to ``param`` in place, one fused pass.

    ``state`` maps buffer names to arrays like ``param`` (see :func:`init_state`); they are
    updated in place too. ``grad_scale`` multiplies the gradient inside the kernel (a clip
    factor); ``maximize=True`` negates it. All arguments are checked before anything changes.
    """
    module = _module(rule)
    hp = {**module.DEFAULTS, **_build_hyper(module, hyper)}
    check = getattr(module, "check", None)
    if check is not None:
        check(hp)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (the number of this update), got {step!r}")
    _validation.check_param(param, "param")
    _validation.check_grad(grad, param, "grad")
    host = state.get("host")
    if host is None:
        host = getattr(module, "host_state", dict)()
    host = dict(host)
    selected, scalars = module.plan(hp, int(step), host)
    buffers = []
    for name in selected.state:
        if name not in state:
            raise ValueError(f"state has no {name!r} buffer; {rule} with these options needs {list(selected.state)}")
        buf = state[name]
        _validation.check_param(buf, f"state[{name!r}]")
        if buf.shape != param.shape or buf.dtype != param.dtype:
            raise ValueError(f"state[{name!r}] has shape {buf.shape} and dtype {buf.dtype}; "
                             f"param has shape {param.shape} and dtype {param.dtype}")
        buffers.append(buf.reshape(-1))
    _validation.check_no_overlap([param, grad] + [state[n] for n in selected.state],
                                 ["param", "grad"] + [f"state[{n!r}]" for n in selected.state])
    table = np.empty((1, selected.ncols), dtype=param.dtype)
    table[0, 0] = -grad_scale if hp["maximize"] else grad_scale
    table[0, 1:] = scalars
    bounds = np.array([0, param.size], dtype=np.int64)
    _build.run_cpu(selected, param.reshape(-1), grad.reshape(-1), buffers, bounds, table)
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
