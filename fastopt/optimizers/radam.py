from __future__ import annotations

from ..kernels import radam as _kernel
from ..optimizer import Optimizer


class RAdam(Optimizer):
    r"""RAdam, rectified Adam (Liu et al., 2020).

    .. math::

        \rho_t = \rho_\infty - \frac{2 t \beta_2^t}{1 - \beta_2^t}, \quad
        \theta_t = \theta_{t-1} - \frac{\eta\, m_t}{1 - \beta_1^t} \cdot
            \begin{cases} r_t \dfrac{\sqrt{1 - \beta_2^t}}{\sqrt{v_t} + \epsilon} & \rho_t > 5 \\
                          1 & \text{otherwise} \end{cases}

    While the variance of the adaptive rate is intractable (:math:`\rho_t \le 5`) the step is
    SGD with momentum; after it, Adam's step scaled by the rectification :math:`r_t`. Same
    options and numbers as ``torch.optim.RAdam``; the full rule, with :math:`\rho_\infty` and
    :math:`r_t`, is in :mod:`fastopt.kernels.radam`.

    Parameters
    ----------
    params : array, sequence of arrays, or sequence of group dicts
    lr : float or callable ``step -> lr``
    betas : (float, float)
    eps : float
    weight_decay : float
    decoupled_weight_decay : bool, AdamW-style decay
    maximize : bool
    clip_grad_norm, skip_nonfinite, grad_noise, seed : gradient transforms fused into the
        update (global-norm clipping, NaN/inf guard, annealed noise): :mod:`fastopt.transforms`
    """

    kernel = _kernel

    def __init__(self, params, *, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 decoupled_weight_decay=False, maximize=False,
                 clip_grad_norm=None, skip_nonfinite=False, grad_noise=None, seed=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=decoupled_weight_decay, maximize=maximize,
                         clip_grad_norm=clip_grad_norm, skip_nonfinite=skip_nonfinite, grad_noise=grad_noise,
                         seed=seed)
