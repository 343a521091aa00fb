r"""Adadelta (Zeiler, 2012).

.. math::

    g_t &\leftarrow g_t + \lambda\theta_{t-1} \\
    E[g^2]_t &= \rho E[g^2]_{t-1} + (1 - \rho) g_t^2 \\
    \Delta_t &= \frac{\sqrt{E[\Delta^2]_{t-1} + \epsilon}}{\sqrt{E[g^2]_t + \epsilon}}\, g_t \\
    E[\Delta^2]_t &= \rho E[\Delta^2]_{t-1} + (1 - \rho)\Delta_t^2 \\
    \theta_t &= \theta_{t-1} - \eta\,\Delta_t

As in ``torch.optim.Adadelta`` and seed 003 (which has :math:`\eta = 1`: "no learning rate").
State buffers: ``square_avg`` (:math:`E[g^2]`), ``acc_delta`` (:math:`E[\Delta^2]`).
Traffic per float32 parameter: 28 bytes.
"""

from __future__ import annotations

import math

from . import _hyper as H
from ._build import Rule


def adadelta_element(p, g, square_avg, acc_delta, lr, l2, rho, one_minus_rho, eps):
    g = g + l2 * p
    square_avg = rho * square_avg + one_minus_rho * g * g
    delta = math.sqrt(acc_delta + eps) / math.sqrt(square_avg + eps) * g
    acc_delta = rho * acc_delta + one_minus_rho * delta * delta
    return p - lr * delta, square_avg, acc_delta


ADADELTA = Rule("adadelta", adadelta_element, ("square_avg", "acc_delta"),
                ("lr", "l2", "rho", "one_minus_rho", "eps"))
RULES = (ADADELTA,)

DEFAULTS = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False}
CHECKS = {"lr": H.learning_rate, "rho": H.unit_closed, "eps": H.nonneg, "weight_decay": H.nonneg,
          "maximize": H.flag}


def buffers(hp: dict) -> dict:
    return dict.fromkeys(ADADELTA.state, 0.0)


def plan(hp: dict, step: int, host: dict):
    rho = hp["rho"]
    return ADADELTA, (hp["lr"], hp["weight_decay"], rho, 1.0 - rho, hp["eps"])
