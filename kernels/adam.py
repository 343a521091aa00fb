r"""Adam, AdamW and AMSGrad (Kingma & Ba, 2015; Loshchilov & Hutter, 2019; Reddi et al., 2018).

With gradient :math:`g_t` (after ``maximize`` and clipping), step :math:`t = 1, 2, \dots`:

.. math::

    g_t &\leftarrow g_t + \lambda \theta_{t-1}                 && \text{(L2, unless decoupled)} \\
    \theta_{t-1} &\leftarrow (1 - \eta\lambda)\,\theta_{t-1}     && \text{(AdamW: decoupled)} \\
    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
    \hat v_t &= \max(\hat v_{t-1}, v_t)                         && \text{(AMSGrad; else } \hat v_t = v_t) \\
    \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}\,
                \frac{m_t}{\sqrt{\hat v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

This is ``torch.optim.Adam``'s form: eps outside the square root, added after the second
bias correction, and AMSGrad keeping the maximum of the *uncorrected* :math:`v_t` and bias
correcting it. Reddi et al.'s AMSGrad (seed 003) drops the bias corrections; the two differ
only in the first steps, and this implementation follows torch.

State buffers: ``exp_avg`` (:math:`m`), ``exp_avg_sq`` (:math:`v`), and with ``amsgrad``
``max_exp_avg_sq`` (:math:`\hat v`). Memory traffic per float32 parameter: 28 bytes (read
p, g, m, v; write p, m, v), 36 with AMSGrad.
"""

from __future__ import annotations

import math

from . import _hyper as H
from ._build import Rule

SCALARS = ("step_size", "inv_bias_correction2_sqrt", "eps", "one_minus_beta1", "beta1", "beta2",
           "one_minus_beta2", "l2", "decay")


def adam_element(p, g, m, v, step_size, inv_bias_correction2_sqrt, eps, one_minus_beta1, beta1, beta2,
                 one_minus_beta2, l2, decay):
    g = g + l2 * p
    p = p * decay
    d = g - m  # torch's lerp: exact at both ends (m + w*d loses m's bits when w is near 1)
    m = m + one_minus_beta1 * d if one_minus_beta1 < beta1 else g - d * beta1
    v = beta2 * v + one_minus_beta2 * g * g
    denom = math.sqrt(v) * inv_bias_correction2_sqrt + eps
    p = p - step_size * (m / denom)
    return p, m, v


def amsgrad_element(p, g, m, v, vmax, step_size, inv_bias_correction2_sqrt, eps, one_minus_beta1,
                    beta1, beta2, one_minus_beta2, l2, decay):
    g = g + l2 * p
    p = p * decay
    d = g - m  # torch's lerp: exact at both ends (m + w*d loses m's bits when w is near 1)
    m = m + one_minus_beta1 * d if one_minus_beta1 < beta1 else g - d * beta1
    v = beta2 * v + one_minus_beta2 * g * g
    vmax = vmax if (vmax > v or vmax != vmax) else v  # max that propagates NaN, like torch
    denom = math.sqrt(vmax) * inv_bias_correction2_sqrt + eps
    p = p - step_size * (m / denom)
    return p, m, v, vmax


ADAM = Rule("adam", adam_element, ("exp_avg", "exp_avg_sq"), SCALARS)
AMSGRAD = Rule("adam_amsgrad", amsgrad_element, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"), SCALARS)
RULES = (ADAM, AMSGRAD)

DEFAULTS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
            "amsgrad": False, "decoupled_weight_decay": False, "maximize": False}
CHECKS = {"lr": H.learning_rate, "betas": H.betas, "eps": H.nonneg, "weight_decay": H.nonneg,
          "amsgrad": H.flag, "decoupled_weight_decay": H.flag, "maximize": H.flag}


def buffers(hp: dict) -> dict:
    """State buffers and their initial value."""
    names = AMSGRAD.state if hp["amsgrad"] else ADAM.state
    return dict.fromkeys(names, 0.0)


def plan(hp: dict, step: int, host: dict):
    """The variant and float64 scalars of update number ``step`` (1-based)."""
    lr, wd = hp["lr"], hp["weight_decay"]
    beta1, beta2 = hp["betas"]
    decoupled = hp["decoupled_weight_decay"]
    scalars = (
        lr / (1.0 - beta1**step),
        1.0 / math.sqrt(1.0 - beta2**step),
        hp["eps"],
        1.0 - beta1,
        beta1,
        beta2,
        1.0 - beta2,
        0.0 if decoupled else wd,
        1.0 - lr * wd if decoupled else 1.0,
    )
    return (AMSGRAD if hp["amsgrad"] else ADAM), scalars
