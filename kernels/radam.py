r"""RAdam, rectified Adam (Liu et al., 2020).

With :math:`\rho_\infty = 2 / (1 - \beta_2) - 1` and
:math:`\rho_t = \rho_\infty - 2 t \beta_2^t / (1 - \beta_2^t)`:

.. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    r_t &= \sqrt{\frac{(\rho_t - 4)(\rho_t - 2)\rho_\infty}{(\rho_\infty - 4)(\rho_\infty - 2)\rho_t}} \\
    \theta_t &= \theta_{t-1} - \eta \frac{m_t}{1 - \beta_1^t} \cdot
        \begin{cases} r_t \dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon} & \rho_t > 5 \\
                      1 & \text{otherwise (an SGD-with-momentum step)} \end{cases}

Weight decay is L2 (:math:`g \leftarrow g + \lambda\theta`) or, with
``decoupled_weight_decay``, :math:`\theta \leftarrow (1 - \eta\lambda)\theta` first. As in
``torch.optim.RAdam``. The host picks the branch each step (``rho_t`` does not depend on the
element), so each branch is its own branch-free kernel. State buffers: ``exp_avg``,
``exp_avg_sq``. Traffic per float32 parameter: 28 bytes.
"""

from __future__ import annotations

import math

from . import _hyper as H
from ._build import Rule

SCALARS = ("l2", "decay", "one_minus_beta1", "beta1", "beta2", "one_minus_beta2", "step_size")


def radam_momentum_element(p, g, m, v, l2, decay, one_minus_beta1, beta1, beta2, one_minus_beta2, step_size):
    g = g + l2 * p
    p = p * decay
    d = g - m  # torch's lerp: exact at both ends (m + w*d loses m's bits when w is near 1)
    m = m + one_minus_beta1 * d if one_minus_beta1 < beta1 else g - d * beta1
    v = beta2 * v + one_minus_beta2 * g * g
    return p - step_size * m, m, v


def radam_adaptive_element(p, g, m, v, l2, decay, one_minus_beta1, beta1, beta2, one_minus_beta2, step_size, eps):
    g = g + l2 * p
    p = p * decay
    d = g - m  # torch's lerp: exact at both ends (m + w*d loses m's bits when w is near 1)
    m = m + one_minus_beta1 * d if one_minus_beta1 < beta1 else g - d * beta1
    v = beta2 * v + one_minus_beta2 * g * g
    return p - step_size * (m / (math.sqrt(v) + eps)), m, v


MOMENTUM_PHASE = Rule("radam_momentum", radam_momentum_element, ("exp_avg", "exp_avg_sq"), SCALARS)
ADAPTIVE_PHASE = Rule("radam_adaptive", radam_adaptive_element, ("exp_avg", "exp_avg_sq"), SCALARS + ("eps",))
RULES = (MOMENTUM_PHASE, ADAPTIVE_PHASE)

DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
            "decoupled_weight_decay": False, "maximize": False}
CHECKS = {"lr": H.learning_rate, "betas": H.betas, "eps": H.nonneg, "weight_decay": H.nonneg,
          "decoupled_weight_decay": H.flag, "maximize": H.flag}


def buffers(hp: dict) -> dict:
    return dict.fromkeys(ADAPTIVE_PHASE.state, 0.0)


def plan(hp: dict, step: int, host: dict):
    lr, wd = hp["lr"], hp["weight_decay"]
    beta1, beta2 = hp["betas"]
    decoupled = hp["decoupled_weight_decay"]
    bias_correction2 = 1.0 - beta2**step
    bias_correction1 = 1.0 - beta1**step
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * step * beta2**step / bias_correction2
    scalars = (0.0 if decoupled else wd, 1.0 - lr * wd if decoupled else 1.0, 1.0 - beta1, beta1, beta2,
               1.0 - beta2)
    if rho_t <= 5.0:
        return MOMENTUM_PHASE, scalars + (lr / bias_correction1,)
    rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    step_size = lr / bias_correction1 * rect * math.sqrt(bias_correction2)
    return ADAPTIVE_PHASE, scalars + (step_size, hp["eps"])
