r"""NAdam, Adam with Nesterov momentum (Dozat, 2016), with momentum decay.

With :math:`\mu_t = \beta_1 (1 - \tfrac12 \cdot 0.96^{t\psi})` (``momentum_decay`` :math:`\psi`):

.. math::

    g_t &\leftarrow g_t + \lambda\theta_{t-1} \quad\text{or}\quad
          \theta_{t-1} \leftarrow (1 - \eta\lambda)\theta_{t-1} \ \text{(decoupled)} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    d_t &= \sqrt{v_t / (1 - \beta_2^t)} + \epsilon \\
    \theta_t &= \theta_{t-1}
        - \eta \frac{1 - \mu_t}{1 - \prod_{i \le t}\mu_i} \frac{g_t}{d_t}
        - \eta \frac{\mu_{t+1}}{1 - \prod_{i \le t+1}\mu_i} \frac{m_t}{d_t}

As in ``torch.optim.NAdam``. The product :math:`\prod \mu_i` (``mu_product``) is host state,
kept in float64. State buffers: ``exp_avg``, ``exp_avg_sq``. Traffic per float32 parameter:
28 bytes.
"""

from __future__ import annotations

import math

from . import _hyper as H
from ._build import Rule


def nadam_element(p, g, m, v, l2, decay, one_minus_beta1, beta1, beta2, one_minus_beta2,
                  inv_bias_correction2, eps, grad_coef, exp_avg_coef):
    g = g + l2 * p
    p = p * decay
    d = g - m  # torch's lerp: exact at both ends (m + w*d loses m's bits when w is near 1)
    m = m + one_minus_beta1 * d if one_minus_beta1 < beta1 else g - d * beta1
    v = beta2 * v + one_minus_beta2 * g * g
    denom = math.sqrt(v * inv_bias_correction2) + eps
    p = p + grad_coef * (g / denom)
    p = p + exp_avg_coef * (m / denom)
    return p, m, v


NADAM = Rule("nadam", nadam_element, ("exp_avg", "exp_avg_sq"),
             ("l2", "decay", "one_minus_beta1", "beta1", "beta2", "one_minus_beta2", "inv_bias_correction2",
              "eps", "grad_coef", "exp_avg_coef"))
RULES = (NADAM,)

DEFAULTS = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
            "momentum_decay": 4e-3, "decoupled_weight_decay": False, "maximize": False}
CHECKS = {"lr": H.learning_rate, "betas": H.betas, "eps": H.nonneg, "weight_decay": H.nonneg,
          "momentum_decay": H.nonneg, "decoupled_weight_decay": H.flag, "maximize": H.flag}


def buffers(hp: dict) -> dict:
    return dict.fromkeys(NADAM.state, 0.0)


def host_state() -> dict:
    return {"mu_product": 1.0}


def check_host(host: dict) -> dict:
    """Loaded host state: ``mu_product``, a product of momentum coefficients in [0, 1), is a
    real number in [0, 1] (outside it the update's denominators can reach zero)."""
    mu_product = H.unit_closed("mu_product", host["mu_product"])
    return {**host, "mu_product": mu_product}


def plan(hp: dict, step: int, host: dict):
    lr, wd = hp["lr"], hp["weight_decay"]
    beta1, beta2 = hp["betas"]
    psi = hp["momentum_decay"]
    decoupled = hp["decoupled_weight_decay"]
    mu = beta1 * (1.0 - 0.5 * 0.96 ** (step * psi))
    mu_next = beta1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
    mu_product = host["mu_product"] * mu
    host["mu_product"] = mu_product
    scalars = (
        0.0 if decoupled else wd,
        1.0 - lr * wd if decoupled else 1.0,
        1.0 - beta1,
        beta1,
        beta2,
        1.0 - beta2,
        1.0 / (1.0 - beta2**step),
        hp["eps"],
        -lr * (1.0 - mu) / (1.0 - mu_product),
        -lr * mu_next / (1.0 - mu_product * mu_next),
    )
    return NADAM, scalars
