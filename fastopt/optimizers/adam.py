from __future__ import annotations

from ..kernels import adam as _kernel
from ..optimizer import Optimizer


class Adam(Optimizer):
    r"""Adam (Kingma & Ba, 2015), with AMSGrad and decoupled weight decay as options.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \quad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \quad
        \theta_t = \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}
                   \frac{m_t}{\sqrt{v_t}/\sqrt{1 - \beta_2^t} + \epsilon}

    Same options and numbers as ``torch.optim.Adam``; the full rule, with weight decay and
    AMSGrad, is in :mod:`fastopt.kernels.adam`. One fused pass per parameter reads
    :math:`\theta, g, m, v` and writes :math:`\theta, m, v` (28 bytes per float32 element).

    Parameters
    ----------
    params : array, sequence of arrays, or sequence of group dicts
        The arrays to update in place (float32 or float64, C-contiguous, writable).
    lr : float or callable ``step -> lr``
    betas : (float, float), decay rates of the two moments, each in [0, 1)
    eps : float, added to the denominator
    weight_decay : float, L2 penalty (or decoupled, see below)
    amsgrad : bool, keep the running maximum of :math:`v` (Reddi et al., 2018)
    decoupled_weight_decay : bool, AdamW's :math:`\theta \leftarrow (1 - \eta\lambda)\theta`
    maximize : bool, ascend instead of descend
    clip_grad_norm, skip_nonfinite, grad_noise, seed : gradient transforms fused into the
        update (global-norm clipping, NaN/inf guard, annealed noise): :mod:`fastopt.transforms`

    Examples
    --------
    >>> import numpy as np, fastopt as fo
    >>> w = np.zeros(4, np.float32)
    >>> opt = fo.Adam([w], lr=0.1)
    >>> opt.step([np.ones(4, np.float32)])   # the first Adam step moves every weight by lr
    >>> w
    array([-0.1, -0.1, -0.1, -0.1], dtype=float32)
    """

    kernel = _kernel

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, decoupled_weight_decay=False, maximize=False,
                 clip_grad_norm=None, skip_nonfinite=False, grad_noise=None, seed=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, decoupled_weight_decay=decoupled_weight_decay,
                         maximize=maximize,
                         clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, grad_noise=grad_noise,
                         seed=seed)


class AdamW(Optimizer):
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

    .. math::

        \theta_{t-1} \leftarrow (1 - \eta\lambda)\,\theta_{t-1}, \quad
        \text{then the Adam update of } :class:`Adam`

    Same options and numbers as ``torch.optim.AdamW`` (default ``weight_decay=1e-2``).
    """

    kernel = _kernel
    forced = {"decoupled_weight_decay": True}

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, maximize=False,
                 clip_grad_norm=None, skip_nonfinite=False, grad_noise=None, seed=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize,
                         clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, grad_noise=grad_noise,
                         seed=seed)
