r"""Adamax, Adam with the infinity norm (Kingma & Ba, 2015, section 7.1).

.. math::

    g_t &\leftarrow g_t + \lambda\theta_{t-1} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    u_t &= \max(\beta_2 u_{t-1},\ |g_t| + \epsilon) \\
    \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,\frac{m_t}{u_t}

As in ``torch.optim.Adamax`` (eps inside the max, which keeps :math:`u_t > 0`).
State buffers: ``exp_avg`` (:math:`m`), ``exp_inf`` (:math:`u`). Traffic per float32
parameter: 28 bytes.
"""

from __future__ import annotations

from . import _hyper as H
from ._build import Rule


def adamax_element(p, g, m, u, clr, l2, eps, one_minus_beta1, beta1, beta2):
    g = g + l2 * p
    d = g - m  # torch's lerp: exact at both ends (m + w*d loses m's bits when w is near 1)
    m = m + one_minus_beta1 * d if one_minus_beta1 < beta1 else g - d * beta1
    decayed = beta2 * u
    bound = abs(g) + eps
    u = decayed if (decayed > bound or decayed != decayed) else bound  # NaN-propagating max
    return p - clr * (m / u), m, u


ADAMAX = Rule("adamax", adamax_element, ("exp_avg", "exp_inf"),
              ("clr", "l2", "eps", "one_minus_beta1", "beta1", "beta2"))
RULES = (ADAMAX,)

DEFAULTS = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False}
CHECKS = {"lr": H.learning_rate, "betas": H.betas, "eps": H.nonneg, "weight_decay": H.nonneg,
          "maximize": H.flag}


def buffers(hp: dict) -> dict:
    return dict.fromkeys(ADAMAX.state, 0.0)


def plan(hp: dict, step: int, host: dict):
    beta1, beta2 = hp["betas"]
    clr = hp["lr"] / (1.0 - beta1**step)
    return ADAMAX, (clr, hp["weight_decay"], hp["eps"], 1.0 - beta1, beta1, beta2)
