r"""Stochastic gradient descent with optional momentum and Nesterov momentum.

With gradient :math:`g_t` (after ``maximize`` and clipping), weight decay :math:`\lambda`,
momentum :math:`\mu` and dampening :math:`\tau`:

.. math::

    d_t &= g_t + \lambda\theta_{t-1} \\
    b_t &= \begin{cases} d_1 & t = 1,\ \text{momentum\_init="grad"} \text{ (torch)}\\
                         \mu b_{t-1} + (1 - \tau) d_t & \text{otherwise } (b_0 = 0)\end{cases} \\
    \theta_t &= \theta_{t-1} - \eta \cdot \begin{cases} d_t & \mu = 0 \\
                                                        b_t & \text{momentum} \\
                                                        d_t + \mu b_t & \text{Nesterov}\end{cases}

The defaults follow ``torch.optim.SGD``: the buffer starts at the first gradient. Seed 000's
exponential moving average, :math:`v = \beta v + (1 - \beta) g` from :math:`v_0 = 0`, is
``momentum=beta, dampening=beta, momentum_init="zero"`` (HIPS autograd's ``sgd(mass)`` too).
Seed 003's classical momentum, :math:`v_t = \gamma v_{t-1} + \eta g_t,\ \theta \mathrel{-}= v_t`,
is ``momentum=gamma, momentum_init="zero"`` for a constant learning rate.

Nesterov follows torch (Sutskever et al.'s reformulation): the update uses the current
gradient plus :math:`\mu b_t`, which equals seed 003's look-ahead gradient
:math:`\nabla J(\theta - \gamma v)` after the change of variables
:math:`\tilde\theta = \theta - \gamma v`.

State buffer with momentum: ``momentum_buffer``. Traffic per float32 parameter: 12 bytes
plain, 20 with momentum.
"""

from __future__ import annotations

from . import _hyper as H
from ._build import Rule


def sgd_element(p, g, lr, l2):
    d = g + l2 * p
    return (p - lr * d,)


def momentum_element(p, g, buf, lr, l2, buf_decay, grad_weight):
    d = g + l2 * p
    buf = buf_decay * buf + grad_weight * d
    return p - lr * buf, buf


def nesterov_element(p, g, buf, lr, l2, buf_decay, grad_weight, momentum):
    d = g + l2 * p
    buf = buf_decay * buf + grad_weight * d
    return p - lr * (d + momentum * buf), buf


SGD = Rule("sgd", sgd_element, (), ("lr", "l2"))
MOMENTUM = Rule("sgd_momentum", momentum_element, ("momentum_buffer",),
                ("lr", "l2", "buf_decay", "grad_weight"))
NESTEROV = Rule("sgd_nesterov", nesterov_element, ("momentum_buffer",),
                ("lr", "l2", "buf_decay", "grad_weight", "momentum"))
RULES = (SGD, MOMENTUM, NESTEROV)

DEFAULTS = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "nesterov": False,
            "weight_decay": 0.0, "momentum_init": "grad", "maximize": False}
CHECKS = {"lr": H.learning_rate, "momentum": H.nonneg, "dampening": H.unit_closed, "nesterov": H.flag,
          "weight_decay": H.nonneg, "momentum_init": H.choice("grad", "zero"), "maximize": H.flag}


def check(hp: dict) -> None:
    """Constraints between options (torch's, word for word where it has them)."""
    if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


def buffers(hp: dict) -> dict:
    return {"momentum_buffer": 0.0} if hp["momentum"] != 0 else {}


def host_state() -> dict:
    return {"momentum_started": False}


def check_host(host: dict) -> dict:
    """Loaded host state: ``momentum_started`` is a bool (or 0/1)."""
    return {**host, "momentum_started": H.flag("momentum_started", host["momentum_started"])}


def discard(host: dict, names) -> dict:
    """Host state once the buffers ``names`` are dropped (momentum switched off): switched on
    again, momentum starts afresh, as on its first step."""
    return {**host, "momentum_started": False} if "momentum_buffer" in names else host


def plan(hp: dict, step: int, host: dict):
    lr, mu = hp["lr"], hp["momentum"]
    if mu == 0:
        return SGD, (lr, hp["weight_decay"])
    if hp["momentum_init"] == "grad" and not host.get("momentum_started"):
        # torch: the buffer starts as a copy of d on the first step that uses momentum
        buf_decay, grad_weight = 0.0, 1.0
        host["momentum_started"] = True
    else:
        buf_decay, grad_weight = mu, 1.0 - hp["dampening"]
    scalars = (lr, hp["weight_decay"], buf_decay, grad_weight)
    if hp["nesterov"]:
        return NESTEROV, scalars + (mu,)
    return MOMENTUM, scalars
