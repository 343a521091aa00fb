from __future__ import annotations

from ..kernels import nadam as _kernel
from ..optimizer import Optimizer


class NAdam(Optimizer):
    r"""NAdam, Adam with Nesterov momentum (Dozat, 2016).

    .. math::

        \mu_t = \beta_1\bigl(1 - \tfrac12 0.96^{t\psi}\bigr), \quad
        \theta_t = \theta_{t-1}
          - \eta\frac{1 - \mu_t}{1 - \prod_{i \le t}\mu_i}\frac{g_t}{d_t}
          - \eta\frac{\mu_{t+1}}{1 - \prod_{i \le t+1}\mu_i}\frac{m_t}{d_t}

    with :math:`d_t = \sqrt{v_t / (1 - \beta_2^t)} + \epsilon`. Same options and numbers as
    ``torch.optim.NAdam``. See :mod:`fastopt.kernels.nadam`.

    Parameters
    ----------
    params : array, sequence of arrays, or sequence of group dicts
    lr : float or callable ``step -> lr``
    betas : (float, float)
    eps : float
    weight_decay : float
    momentum_decay : float, :math:`\psi`
    decoupled_weight_decay : bool, AdamW-style decay
    maximize : bool
    clip_grad_norm, skip_nonfinite, grad_noise, seed : gradient transforms fused into the
        update (global-norm clipping, NaN/inf guard, annealed noise): :mod:`fastopt.transforms`
    """

    kernel = _kernel

    def __init__(self, params, *, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, maximize=False,
                 clip_grad_norm=None, skip_nonfinite=False, grad_noise=None, seed=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         momentum_decay=momentum_decay, decoupled_weight_decay=decoupled_weight_decay,
                         maximize=maximize,
                         clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, grad_noise=grad_noise,
                         seed=seed)
