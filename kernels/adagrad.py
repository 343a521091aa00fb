r"""Adagrad (Duchi et al., 2011).

.. math::

    \eta_t &= \frac{\eta}{1 + (t - 1)\,\delta}                 && \text{(lr\_decay } \delta) \\
    g_t &\leftarrow g_t + \lambda\theta_{t-1} \\
    G_t &= G_{t-1} + g_t^2                                     && (G_0 = \text{initial\_accumulator\_value}) \\
    \theta_t &= \theta_{t-1} - \eta_t \frac{g_t}{\sqrt{G_t} + \epsilon}

This is ``torch.optim.Adagrad``. Seed 003 (and Karpathy's min-char-rnn) put eps inside the
square root, :math:`\theta_t = \theta_{t-1} - \eta\, g_t / \sqrt{G_t + \epsilon}`:
``eps_inside_sqrt=True``.

State buffer: ``sum`` (:math:`G`). Traffic per float32 parameter: 20 bytes.
"""

from __future__ import annotations

import math

from . import _hyper as H
from ._build import Rule


def adagrad_element(p, g, acc, clr, l2, eps_inside, eps_outside):
    g = g + l2 * p
    acc = acc + g * g
    std = math.sqrt(acc + eps_inside) + eps_outside
    return p - clr * (g / std), acc


ADAGRAD = Rule("adagrad", adagrad_element, ("sum",), ("clr", "l2", "eps_inside", "eps_outside"))
RULES = (ADAGRAD,)

DEFAULTS = {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
            "eps": 1e-10, "eps_inside_sqrt": False, "maximize": False}
CHECKS = {"lr": H.learning_rate, "lr_decay": H.nonneg, "weight_decay": H.nonneg,
          "initial_accumulator_value": H.nonneg, "eps": H.nonneg, "eps_inside_sqrt": H.flag,
          "maximize": H.flag}


def buffers(hp: dict) -> dict:
    return {"sum": hp["initial_accumulator_value"]}


def plan(hp: dict, step: int, host: dict):
    eps = hp["eps"]
    inside = hp["eps_inside_sqrt"]
    clr = hp["lr"] / (1.0 + (step - 1) * hp["lr_decay"])
    return ADAGRAD, (clr, hp["weight_decay"], eps if inside else 0.0, 0.0 if inside else eps)
