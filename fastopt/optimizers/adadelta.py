from __future__ import annotations

from ..kernels import adadelta as _kernel
from ..optimizer import Optimizer


class Adadelta(Optimizer):
    r"""Adadelta (Zeiler, 2012).

    .. math::

        E[g^2]_t = \rho E[g^2]_{t-1} + (1 - \rho) g_t^2, \quad
        \Delta_t = \frac{\sqrt{E[\Delta^2]_{t-1} + \epsilon}}{\sqrt{E[g^2]_t + \epsilon}} g_t, \quad
        \theta_t = \theta_{t-1} - \eta\Delta_t

    Same options and numbers as ``torch.optim.Adadelta``. See :mod:`fastopt.kernels.adadelta`.

    Parameters
    ----------
    params : array, sequence of arrays, or sequence of group dicts
    lr : float or callable ``step -> lr`` (1.0: the paper's rule has no learning rate)
    rho : float in [0, 1]
    eps : float
    weight_decay : float, L2 penalty
    maximize : bool
    clip_grad_norm, skip_nonfinite, grad_noise, seed : gradient transforms fused into the
        update (global-norm clipping, NaN/inf guard, annealed noise): :mod:`fastopt.transforms`
    """

    kernel = _kernel

    def __init__(self, params, *, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False,
                 clip_grad_norm=None, skip_nonfinite=False, grad_noise=None, seed=None):
        super().__init__(params, lr=lr, rho=rho, eps=eps, weight_decay=weight_decay, maximize=maximize,
                         clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, grad_noise=grad_noise,
                         seed=seed)
