from __future__ import annotations

from ..kernels import rmsprop as _kernel
from ..optimizer import Optimizer


class RMSprop(Optimizer):
    r"""RMSprop (Hinton), optionally centered and with momentum.

    .. math::

        v_t = \alpha v_{t-1} + (1 - \alpha) g_t^2, \quad
        \theta_t = \theta_{t-1} - \eta\,\frac{g_t}{\sqrt{v_t} + \epsilon}

    Same options and numbers as ``torch.optim.RMSprop``. ``eps_inside_sqrt=True`` gives
    seeds 000 and 003's :math:`g_t / \sqrt{v_t + \epsilon}`. The centered and momentum forms
    are in :mod:`fastopt.kernels.rmsprop`.

    Parameters
    ----------
    params : array, sequence of arrays, or sequence of group dicts
    lr : float or callable ``step -> lr``
    alpha : float, smoothing constant
    eps : float
    weight_decay : float, L2 penalty
    momentum : float
    centered : bool, divide by the estimated variance instead of the second moment
    eps_inside_sqrt : bool
    maximize : bool
    clip_grad_norm, skip_nonfinite, grad_noise, seed : gradient transforms fused into the
        update (global-norm clipping, NaN/inf guard, annealed noise): :mod:`fastopt.transforms`
    """

    kernel = _kernel

    def __init__(self, params, *, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, eps_inside_sqrt=False, maximize=False,
                 clip_grad_norm=None, skip_nonfinite=False, grad_noise=None, seed=None):
        super().__init__(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                         momentum=momentum, centered=centered, eps_inside_sqrt=eps_inside_sqrt,
                         maximize=maximize,
                         clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, grad_noise=grad_noise,
                         seed=seed)
