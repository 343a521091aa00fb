from __future__ import annotations

from ..kernels import adagrad as _kernel
from ..optimizer import Optimizer


class Adagrad(Optimizer):
    r"""Adagrad (Duchi et al., 2011).

    .. math::

        G_t = G_{t-1} + g_t^2, \quad
        \theta_t = \theta_{t-1} - \frac{\eta}{1 + (t - 1)\delta}\,\frac{g_t}{\sqrt{G_t} + \epsilon}

    Same options and numbers as ``torch.optim.Adagrad``. ``eps_inside_sqrt=True`` gives
    seed 003's :math:`g_t / \sqrt{G_t + \epsilon}`. See :mod:`fastopt.kernels.adagrad`.

    Parameters
    ----------
    params : array, sequence of arrays, or sequence of group dicts
    lr : float or callable ``step -> lr``
    lr_decay : float, :math:`\delta`
    weight_decay : float, L2 penalty
    initial_accumulator_value : float, :math:`G_0`
    eps : float
    eps_inside_sqrt : bool
    maximize : bool
    clip_grad_norm, skip_nonfinite, grad_noise, seed : gradient transforms fused into the
        update (global-norm clipping, NaN/inf guard, annealed noise): :mod:`fastopt.transforms`
    """

    kernel = _kernel

    def __init__(self, params, *, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
                 initial_accumulator_value=0.0, eps=1e-10, eps_inside_sqrt=False, maximize=False,
                 clip_grad_norm=None, skip_nonfinite=False, grad_noise=None, seed=None):
        super().__init__(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                         initial_accumulator_value=initial_accumulator_value, eps=eps,
                         eps_inside_sqrt=eps_inside_sqrt, maximize=maximize,
                         clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, grad_noise=grad_noise,
                         seed=seed)
