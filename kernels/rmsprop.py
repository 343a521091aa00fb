r"""RMSprop (Hinton, Lecture 6e), optionally centered (Graves, 2013) and with momentum.

.. math::

    g_t &\leftarrow g_t + \lambda\theta_{t-1} \\
    v_t &= \alpha v_{t-1} + (1 - \alpha) g_t^2 \\
    \bar g_t &= \alpha \bar g_{t-1} + (1 - \alpha) g_t          && \text{(centered)} \\
    s_t &= \sqrt{v_t - \bar g_t^2} + \epsilon \quad\text{(centered), else}\quad \sqrt{v_t} + \epsilon \\
    b_t &= \mu b_{t-1} + g_t / s_t                              && \text{(momentum } \mu > 0) \\
    \theta_t &= \theta_{t-1} - \eta\, b_t \quad\text{or}\quad \theta_{t-1} - \eta\, g_t / s_t

This is ``torch.optim.RMSprop``. Seeds 000 and 003 put eps inside the square root,
:math:`\theta \mathrel{-}= \eta\, g / \sqrt{v + \epsilon}`: ``eps_inside_sqrt=True``
(then :math:`s_t = \sqrt{v_t - \bar g_t^2 + \epsilon}` when centered).

State buffers: ``square_avg`` (:math:`v`), ``grad_avg`` (:math:`\bar g`, centered) and
``momentum_buffer`` (:math:`b`, momentum). Traffic per float32 parameter: 20 bytes, plus 8
for each of centered and momentum.
"""

from __future__ import annotations

import math

from . import _hyper as H
from ._build import Rule

SCALARS = ("lr", "l2", "alpha", "one_minus_alpha", "eps_inside", "eps_outside")


def rmsprop_element(p, g, square_avg, lr, l2, alpha, one_minus_alpha, eps_inside, eps_outside):
    g = g + l2 * p
    square_avg = alpha * square_avg + one_minus_alpha * g * g
    avg = math.sqrt(square_avg + eps_inside) + eps_outside
    return p - lr * (g / avg), square_avg


def centered_element(p, g, square_avg, grad_avg, lr, l2, alpha, one_minus_alpha, eps_inside,
                     eps_outside):
    g = g + l2 * p
    square_avg = alpha * square_avg + one_minus_alpha * g * g
    d = g - grad_avg  # torch's lerp: exact at both ends
    grad_avg = grad_avg + one_minus_alpha * d if one_minus_alpha < alpha else g - d * alpha
    avg = math.sqrt(square_avg - grad_avg * grad_avg + eps_inside) + eps_outside
    return p - lr * (g / avg), square_avg, grad_avg


def momentum_element(p, g, square_avg, buf, lr, l2, alpha, one_minus_alpha, eps_inside,
                     eps_outside, momentum):
    g = g + l2 * p
    square_avg = alpha * square_avg + one_minus_alpha * g * g
    avg = math.sqrt(square_avg + eps_inside) + eps_outside
    buf = momentum * buf + g / avg
    return p - lr * buf, square_avg, buf


def centered_momentum_element(p, g, square_avg, grad_avg, buf, lr, l2, alpha, one_minus_alpha,
                              eps_inside, eps_outside, momentum):
    g = g + l2 * p
    square_avg = alpha * square_avg + one_minus_alpha * g * g
    d = g - grad_avg  # torch's lerp: exact at both ends
    grad_avg = grad_avg + one_minus_alpha * d if one_minus_alpha < alpha else g - d * alpha
    avg = math.sqrt(square_avg - grad_avg * grad_avg + eps_inside) + eps_outside
    buf = momentum * buf + g / avg
    return p - lr * buf, square_avg, grad_avg, buf


RMSPROP = Rule("rmsprop", rmsprop_element, ("square_avg",), SCALARS)
CENTERED = Rule("rmsprop_centered", centered_element, ("square_avg", "grad_avg"), SCALARS)
MOMENTUM = Rule("rmsprop_momentum", momentum_element, ("square_avg", "momentum_buffer"),
                SCALARS + ("momentum",))
CENTERED_MOMENTUM = Rule("rmsprop_centered_momentum", centered_momentum_element,
                         ("square_avg", "grad_avg", "momentum_buffer"), SCALARS + ("momentum",))
RULES = (RMSPROP, CENTERED, MOMENTUM, CENTERED_MOMENTUM)

DEFAULTS = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
            "centered": False, "eps_inside_sqrt": False, "maximize": False}
CHECKS = {"lr": H.learning_rate, "alpha": H.nonneg, "eps": H.nonneg, "weight_decay": H.nonneg,
          "momentum": H.nonneg, "centered": H.flag, "eps_inside_sqrt": H.flag, "maximize": H.flag}


def _variant(hp: dict) -> Rule:
    return {(False, False): RMSPROP, (True, False): CENTERED, (False, True): MOMENTUM,
            (True, True): CENTERED_MOMENTUM}[(hp["centered"], hp["momentum"] > 0)]


def buffers(hp: dict) -> dict:
    return dict.fromkeys(_variant(hp).state, 0.0)


def plan(hp: dict, step: int, host: dict):
    alpha, eps = hp["alpha"], hp["eps"]
    inside = hp["eps_inside_sqrt"]
    rule = _variant(hp)
    scalars = (hp["lr"], hp["weight_decay"], alpha, 1.0 - alpha, eps if inside else 0.0,
               0.0 if inside else eps)
    if rule in (MOMENTUM, CENTERED_MOMENTUM):
        scalars += (hp["momentum"],)
    return rule, scalars
