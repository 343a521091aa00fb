"""Move an optimizer's state between fastopt and ``torch.optim``.

``torch.optim``'s ``state_dict()`` numbers the parameters ``0, 1, 2, ...`` across its param
groups in order, and holds per parameter a float ``step`` tensor and the state buffers under
the names fastopt uses too (``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``,
``momentum_buffer``, ``square_avg``, ``grad_avg``, ``acc_delta``, ``sum``, ``exp_inf``,
``mu_product``). A fastopt optimizer orders its parameters the same way: group by group, in
the order of each group's ``params`` (for a :class:`~fastopt.FlatParams`, the order of each
selection's names). So a run can move either way::

    import torch, fastopt as fo
    from fastopt.torch_compat import to_torch_state_dict, from_torch_state_dict

    topt.load_state_dict(to_torch_state_dict(opt))     # fastopt -> torch
    from_torch_state_dict(opt, topt.state_dict())      # torch -> fastopt

Only the optimizer state moves; copy the parameter values yourself (torch's state dict holds
none). The optimizers must be the same kind (``fo.Adam`` and ``torch.optim.Adam``) over
parameters of the same shapes in the same order; every mismatch is a ``ValueError`` or
``TypeError`` raised before anything changes.

Options fastopt has and torch lacks (``momentum_init="zero"``, ``eps_inside_sqrt=True``)
cannot be represented in torch's format: :func:`to_torch_state_dict` refuses them, and
:func:`from_torch_state_dict` keeps the optimizer's own value of such options.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from ._validation import check_array_type
from .optimizer import STATE_FORMAT, Optimizer

#: fastopt-only options, with the value that means what torch does.
FASTOPT_ONLY = {"momentum_init": "grad", "eps_inside_sqrt": False}


def _import_torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - exercised only without torch
        raise ImportError("fastopt.torch_compat needs PyTorch (pip install torch)") from None
    return torch


def _check_optimizer(opt) -> None:
    if not isinstance(opt, Optimizer):
        raise TypeError(f"expected a fastopt optimizer, got {type(opt).__name__}")


def _keys(opt) -> list[list[Any]]:
    """Each group's parameter keys (positions, or names over a FlatParams), in torch order."""
    return [[slot.index for slot in slots] for slots in opt._group_slots]


def to_torch_state_dict(opt: Optimizer, *, fastopt_options: bool = False) -> dict:
    """``opt``'s state in ``torch.optim``'s ``state_dict`` format.

    Parameters
    ----------
    opt : fastopt.Optimizer
        Any fastopt optimizer, over arrays or over a FlatParams.
    fastopt_options : bool
        Write fastopt-only options (``momentum_init``, ``eps_inside_sqrt``) into the groups,
        whatever their values, instead of refusing values torch lacks (``fastopt.torch``'s
        checkpoints: ``torch.optim`` ignores the extra keys).

    Returns
    -------
    dict
        ``{"state": {i: {"step": tensor, <buffer>: tensor, ...}}, "param_groups": [...]}``
        with parameters numbered in group order, ready for the ``load_state_dict`` of the
        ``torch.optim`` class of the same name. A schedule ``lr`` is written as its value
        at the current step. SGD writes ``momentum_buffer`` only once momentum has started
        (torch then starts it from the next gradient, as fastopt would).

    Raises
    ------
    ValueError
        If a group uses an option torch lacks (``momentum_init="zero"``,
        ``eps_inside_sqrt=True``) and ``fastopt_options`` is false.
    """
    _check_optimizer(opt)
    torch = _import_torch()
    sd = opt.state_dict()
    keys = _keys(opt)
    groups, state = [], {}
    number = 0
    for gi, (group, saved, names) in enumerate(zip(opt.param_groups, sd["param_groups"], keys)):
        out = {}
        for key, value in saved.items():
            if key == "params":
                continue
            if key in FASTOPT_ONLY and not fastopt_options:
                if value != FASTOPT_ONLY[key]:
                    raise ValueError(f"param group {gi} has {key}={value!r}, which torch.optim has no "
                                     f"equivalent of (only {key}={FASTOPT_ONLY[key]!r} can be converted)")
                continue
            if key == "lr" and value is None:  # a schedule: its value now
                value = float(group["lr"](opt.step_count))
            out[key] = value
        out["params"] = list(range(number, number + len(names)))
        groups.append(out)
        for key in names:
            entry = sd["state"][key]
            tstate = {}
            for name, value in entry.items():
                if name == "momentum_started":
                    continue
                if name == "step":
                    tstate["step"] = torch.tensor(float(value), dtype=torch.float32)
                elif isinstance(value, np.ndarray):
                    tstate[name] = torch.from_numpy(value)
                else:
                    tstate[name] = torch.tensor(float(value), dtype=torch.float32)
            if "momentum_started" in entry:  # SGD: torch keeps no step, and a buffer only once started
                tstate.pop("step", None)
                if not entry["momentum_started"]:
                    tstate.pop("momentum_buffer", None)
            if tstate:
                state[number] = tstate
            number += 1
    return {"state": state, "param_groups": groups}


def _scalar(value) -> Any:
    """A Python scalar from a number or a 0-d tensor/array."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    return value


def _array(torch, value, like: np.ndarray, where: str) -> np.ndarray:
    if torch.is_tensor(value):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"{where} must be a tensor, got {type(value).__name__}")
    check_array_type(value, where)  # a masked array's mask would be dropped silently
    if value.shape != like.shape:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, the parameter has shape {like.shape}")
    if value.dtype.kind != "f":
        raise TypeError(f"{where} has dtype {value.dtype}, expected floating point")
    return np.array(value, dtype=like.dtype)  # torch casts state to the parameter's dtype too


def from_torch_state_dict(opt: Optimizer, state_dict: dict, *, fastopt_options: bool = False) -> None:
    """Load a ``torch.optim`` ``state_dict`` into ``opt`` (state and hyper-parameters).

    Parameters
    ----------
    opt : fastopt.Optimizer
        The fastopt optimizer of the same kind, over parameters of the same shapes, in the
        same groups and order as the torch optimizer's.
    state_dict : dict
        ``torch_optimizer.state_dict()``.
    fastopt_options : bool
        Read fastopt-only options from the groups where present (what
        ``to_torch_state_dict(..., fastopt_options=True)`` writes) instead of keeping ``opt``'s.

    Notes
    -----
    Parameters without torch state (torch creates it lazily, at their first step) start
    fresh. Buffers are cast to the parameter's dtype, as torch does. torch-only options
    (``foreach``, ``fused``, ``capturable``, ``differentiable``) are ignored; fastopt-only
    options keep ``opt``'s values. ``opt.step_count`` (what an ``lr`` schedule sees) becomes
    the largest per-parameter step. The whole dict is checked before ``opt`` changes.
    """
    _check_optimizer(opt)
    torch = _import_torch()
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise TypeError("expected a torch.optim state_dict: a dict with 'state' and 'param_groups'")
    tgroups, tstate = state_dict["param_groups"], state_dict["state"]
    keys = _keys(opt)
    if not isinstance(tgroups, (list, tuple)) or len(tgroups) != len(keys):
        raise ValueError(f"torch state_dict has {len(tgroups) if isinstance(tgroups, (list, tuple)) else 'no'} "
                         f"param groups; this optimizer has {len(keys)}")
    kernel = opt.kernel
    host_defaults = getattr(kernel, "host_state", dict)()
    slots = {slot.index: slot for group in opt._group_slots for slot in group}
    groups, state, steps = [], {}, [0]
    for gi, (tg, names, group) in enumerate(zip(tgroups, keys, opt.param_groups)):
        indices = list(tg.get("params", ()))
        if len(indices) != len(names):
            raise ValueError(f"torch param group {gi} has {len(indices)} parameters; this optimizer's has {len(names)}")
        hp = {}
        for key in kernel.CHECKS:
            if key == "lr" and callable(group["lr"]):
                hp[key] = None  # keep the schedule (load_state_dict reads None so)
            elif key in tg and (fastopt_options or key not in FASTOPT_ONLY):
                value = tg[key]
                hp[key] = tuple(_scalar(v) for v in value) if key == "betas" else _scalar(value)
            else:
                hp[key] = group[key]
        hp.update(opt.forced)
        checked = opt._check_hyper({k: v for k, v in hp.items() if v is not None}, f"torch param group {gi}: ")
        expected = kernel.buffers(checked)
        groups.append({**hp, "params": list(names)})
        for number, key in zip(indices, names):
            entry = tstate.get(number, tstate.get(str(number), {}))
            if not isinstance(entry, dict):
                raise TypeError(f"torch state of parameter {number} must be a dict, got {type(entry).__name__}")
            known = set(expected) | set(host_defaults) | {"step"}
            unknown = sorted(set(entry) - known)
            if unknown:
                raise ValueError(f"torch state of parameter {number} has {', '.join(unknown)}, which "
                                 f"fastopt.{type(opt).__name__} with these options does not use "
                                 "(is it from another optimizer?)")
            param = slots[key].param
            step = _scalar(entry.get("step", 0))
            if isinstance(step, float) and step.is_integer():
                step = int(step)
            if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
                raise ValueError(f"torch state of parameter {number}: step must be a whole number >= 0, got {step!r}")
            out: dict[str, Any] = {"step": int(step)}
            for name, init in expected.items():
                value = entry.get(name)
                out[name] = (np.full(param.shape, init, dtype=param.dtype) if value is None
                             else _array(torch, value, param, f"torch state of parameter {number}: {name}"))
            host = dict(host_defaults)
            for name in host_defaults:
                if name in entry:
                    value = float(_scalar(entry[name]))
                    if not math.isfinite(value):
                        raise ValueError(f"torch state of parameter {number}: {name} is not finite")
                    host[name] = value
            if "momentum_started" in host:  # SGD: momentum has started once torch has a buffer
                host["momentum_started"] = entry.get("momentum_buffer") is not None
            out.update(host)
            state[key] = out
            steps.append(int(step))
    opt.load_state_dict({"optimizer": type(opt).__name__, "format": STATE_FORMAT, "step_count": max(steps),
                         "param_groups": groups, "state": state})


__all__ = ["FASTOPT_ONLY", "from_torch_state_dict", "to_torch_state_dict"]
