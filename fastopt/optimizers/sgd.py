from __future__ import annotations

from ..kernels import sgd as _kernel
from ..optimizer import Optimizer


class SGD(Optimizer):
    r"""Stochastic gradient descent, with optional (Nesterov) momentum.

    .. math::

        d_t = g_t + \lambda\theta_{t-1}, \quad
        b_t = \mu b_{t-1} + (1 - \tau) d_t \ (b_1 = d_1), \quad
        \theta_t = \theta_{t-1} - \eta \cdot (d_t \text{ or } b_t \text{ or } d_t + \mu b_t)

    Same options and numbers as ``torch.optim.SGD``. Seed 000's EMA momentum
    (:math:`v = \beta v + (1 - \beta) g`, :math:`v_0 = 0`) is
    ``SGD(params, momentum=beta, dampening=beta, momentum_init="zero")``.
    The full derivation is in :mod:`fastopt.kernels.sgd`.

    Parameters
    ----------
    params : array, sequence of arrays, or sequence of group dicts
    lr : float or callable ``step -> lr``
    momentum : float, momentum factor :math:`\mu` (0 disables the buffer)
    dampening : float, :math:`\tau`
    nesterov : bool, Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``)
    weight_decay : float, L2 penalty :math:`\lambda`
    momentum_init : ``"grad"`` (torch: :math:`b_1 = d_1`) or ``"zero"`` (:math:`b_0 = 0`)
    maximize : bool, ascend instead of descend
    clip_grad_norm, skip_nonfinite, grad_noise, seed : gradient transforms fused into the
        update (global-norm clipping, NaN/inf guard, annealed noise): :mod:`fastopt.transforms`

    Examples
    --------
    >>> import numpy as np, fastopt as fo
    >>> w = np.ones(3, np.float32)
    >>> opt = fo.SGD(w, lr=0.1, momentum=0.9)
    >>> opt.step(np.full(3, 2.0, np.float32))
    >>> w
    array([0.8, 0.8, 0.8], dtype=float32)
    """

    kernel = _kernel

    def __init__(self, params, *, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False,
                 weight_decay=0.0, momentum_init="grad", maximize=False,
                 clip_grad_norm=None, skip_nonfinite=False, grad_noise=None, seed=None):
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                         weight_decay=weight_decay, momentum_init=momentum_init, maximize=maximize,
                         clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, grad_noise=grad_noise,
                         seed=seed)
