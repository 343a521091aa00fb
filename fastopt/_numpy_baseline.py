r"""Vectorized NumPy optimizers: the baseline ``fastopt bench`` compares the fused kernels with.

Each class is what a careful NumPy user would write from the update rule: whole-array
operations, in place where NumPy allows (``out=`` and augmented assignment), with one or two
preallocated scratch arrays, so a steady-state step allocates nothing. The arithmetic stays in
the parameter's dtype (Python float scalars do not promote a float32 array). Every pass over an
array is a separate trip through memory; that, not the arithmetic, is what the fused kernels
save.

The rules and defaults are ``torch.optim``'s (eps outside the square root, SGD's momentum
buffer starting at the first gradient) for the options ``fastopt bench`` uses: ``lr``,
``weight_decay`` (L2, or decoupled for AdamW) and each rule's decay rates. Tests check every
class against :mod:`fastopt`'s optimizers, so the benchmark compares equal work.
"""

from __future__ import annotations

import math

import numpy as np


class Baseline:
    """A NumPy optimizer for one parameter array, updated in place by :meth:`step`."""

    #: Names of the state buffers, in the order the rule reads them.
    state_names: tuple[str, ...] = ()

    def __init__(self, param: np.ndarray, lr: float, weight_decay: float = 0.0):
        self.p = param
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.t = 0
        self.tmp = np.empty_like(param)
        for name in self.state_names:
            setattr(self, name, np.zeros_like(param))

    def _l2(self, g: np.ndarray) -> np.ndarray:
        """``g + weight_decay * p`` (a new array; only when weight decay is on)."""
        return g + self.weight_decay * self.p if self.weight_decay else g

    def step(self, g: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


class SGD(Baseline):
    r""":math:`b_t = \mu b_{t-1} + g_t` (:math:`b_1 = g_1`), :math:`\theta \mathrel{-}= \eta b_t`."""

    def __init__(self, param, lr=1e-3, momentum=0.0, weight_decay=0.0):
        self.momentum = float(momentum)
        self.state_names = ("momentum_buffer",) if momentum else ()
        super().__init__(param, lr, weight_decay)

    def step(self, g):
        g = self._l2(g)
        self.t += 1
        d = g
        if self.momentum:
            buf = self.momentum_buffer
            if self.t == 1:
                np.copyto(buf, g)
            else:
                buf *= self.momentum
                buf += g
            d = buf
        np.multiply(d, self.lr, out=self.tmp)
        self.p -= self.tmp


class Adagrad(Baseline):
    r""":math:`G_t = G_{t-1} + g_t^2`, :math:`\theta \mathrel{-}= \eta\, g_t / (\sqrt{G_t} + \epsilon)`."""

    state_names = ("sum",)

    def __init__(self, param, lr=1e-2, eps=1e-10, weight_decay=0.0):
        self.eps = float(eps)
        super().__init__(param, lr, weight_decay)

    def step(self, g):
        g = self._l2(g)
        self.t += 1
        tmp = self.tmp
        np.multiply(g, g, out=tmp)
        self.sum += tmp
        np.sqrt(self.sum, out=tmp)
        tmp += self.eps
        np.divide(g, tmp, out=tmp)
        tmp *= self.lr
        self.p -= tmp


class Adadelta(Baseline):
    r""":math:`E[g^2]_t = \rho E[g^2]_{t-1} + (1-\rho) g_t^2`,
    :math:`\Delta_t = \sqrt{E[\Delta^2]_{t-1} + \epsilon} / \sqrt{E[g^2]_t + \epsilon}\; g_t`,
    :math:`E[\Delta^2]_t = \rho E[\Delta^2]_{t-1} + (1-\rho)\Delta_t^2`,
    :math:`\theta \mathrel{-}= \eta \Delta_t`."""

    state_names = ("square_avg", "acc_delta")

    def __init__(self, param, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0):
        self.rho, self.eps = float(rho), float(eps)
        super().__init__(param, lr, weight_decay)
        self.tmp2 = np.empty_like(param)

    def step(self, g):
        g = self._l2(g)
        self.t += 1
        rho, eps, tmp, tmp2 = self.rho, self.eps, self.tmp, self.tmp2
        self.square_avg *= rho
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - rho
        self.square_avg += tmp
        np.add(self.acc_delta, eps, out=tmp)
        np.sqrt(tmp, out=tmp)
        np.add(self.square_avg, eps, out=tmp2)
        np.sqrt(tmp2, out=tmp2)
        tmp /= tmp2
        tmp *= g  # tmp = delta
        self.acc_delta *= rho
        np.multiply(tmp, tmp, out=tmp2)
        tmp2 *= 1.0 - rho
        self.acc_delta += tmp2
        tmp *= self.lr
        self.p -= tmp


class RMSprop(Baseline):
    r""":math:`v_t = \alpha v_{t-1} + (1-\alpha) g_t^2`,
    :math:`\theta \mathrel{-}= \eta\, g_t / (\sqrt{v_t} + \epsilon)`."""

    state_names = ("square_avg",)

    def __init__(self, param, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0):
        self.alpha, self.eps = float(alpha), float(eps)
        super().__init__(param, lr, weight_decay)

    def step(self, g):
        g = self._l2(g)
        self.t += 1
        tmp = self.tmp
        self.square_avg *= self.alpha
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.alpha
        self.square_avg += tmp
        np.sqrt(self.square_avg, out=tmp)
        tmp += self.eps
        np.divide(g, tmp, out=tmp)
        tmp *= self.lr
        self.p -= tmp


class _Moments(Baseline):
    """Shared by the Adam family: the two exponential moving averages."""

    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(self, param, lr, betas, eps, weight_decay, decoupled=False):
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.decoupled = bool(decoupled)
        super().__init__(param, lr, weight_decay)

    def _l2(self, g):
        return g if self.decoupled else super()._l2(g)

    def _moments(self, g):
        """Decoupled decay, then :math:`m \\mathrel{+}= (1-\\beta_1)(g - m)`,
        :math:`v = \\beta_2 v + (1-\\beta_2) g^2`."""
        if self.decoupled and self.weight_decay:
            self.p *= 1.0 - self.lr * self.weight_decay
        tmp = self.tmp
        self.exp_avg *= self.beta1
        np.multiply(g, 1.0 - self.beta1, out=tmp)
        self.exp_avg += tmp
        self.exp_avg_sq *= self.beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - self.beta2
        self.exp_avg_sq += tmp


class Adam(_Moments):
    r""":math:`\theta \mathrel{-}= \frac{\eta}{1-\beta_1^t} \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon}`
    (AdamW: ``decoupled=True``, :math:`\theta \leftarrow (1 - \eta\lambda)\theta` first)."""

    def __init__(self, param, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        super().__init__(param, lr, betas, eps, weight_decay, decoupled)

    def step(self, g):
        g = self._l2(g)
        self.t += 1
        self._moments(g)
        tmp = self.tmp
        np.sqrt(self.exp_avg_sq, out=tmp)
        tmp *= 1.0 / math.sqrt(1.0 - self.beta2**self.t)
        tmp += self.eps
        np.divide(self.exp_avg, tmp, out=tmp)
        tmp *= self.lr / (1.0 - self.beta1**self.t)
        self.p -= tmp


class AdamW(Adam):
    """Adam with decoupled weight decay (torch's default ``weight_decay=1e-2``)."""

    def __init__(self, param, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(param, lr, betas, eps, weight_decay, decoupled=True)


class Adamax(Baseline):
    r""":math:`u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon)`,
    :math:`\theta \mathrel{-}= \frac{\eta}{1-\beta_1^t} m_t / u_t`."""

    state_names = ("exp_avg", "exp_inf")

    def __init__(self, param, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        super().__init__(param, lr, weight_decay)

    def step(self, g):
        g = self._l2(g)
        self.t += 1
        tmp = self.tmp
        self.exp_avg *= self.beta1
        np.multiply(g, 1.0 - self.beta1, out=tmp)
        self.exp_avg += tmp
        self.exp_inf *= self.beta2
        np.abs(g, out=tmp)
        tmp += self.eps
        np.maximum(self.exp_inf, tmp, out=self.exp_inf)
        np.divide(self.exp_avg, self.exp_inf, out=tmp)
        tmp *= self.lr / (1.0 - self.beta1**self.t)
        self.p -= tmp


class NAdam(_Moments):
    r"""With :math:`\mu_t = \beta_1(1 - \frac12 0.96^{t\psi})` and :math:`d_t = \sqrt{v_t/(1-\beta_2^t)} + \epsilon`:
    :math:`\theta \mathrel{-}= \eta\frac{1-\mu_t}{1-\prod_{i\le t}\mu_i}\frac{g_t}{d_t}
    + \eta\frac{\mu_{t+1}}{1-\prod_{i\le t+1}\mu_i}\frac{m_t}{d_t}`."""

    def __init__(self, param, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum_decay=4e-3):
        self.momentum_decay = float(momentum_decay)
        self.mu_product = 1.0
        super().__init__(param, lr, betas, eps, weight_decay)
        self.tmp2 = np.empty_like(param)

    def step(self, g):
        g = self._l2(g)
        self.t += 1
        t, b1, psi = self.t, self.beta1, self.momentum_decay
        mu = b1 * (1.0 - 0.5 * 0.96 ** (t * psi))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
        self.mu_product *= mu
        self._moments(g)
        tmp, tmp2 = self.tmp, self.tmp2
        np.multiply(self.exp_avg_sq, 1.0 / (1.0 - self.beta2**t), out=tmp)
        np.sqrt(tmp, out=tmp)
        tmp += self.eps  # tmp = d_t
        np.divide(g, tmp, out=tmp2)
        tmp2 *= self.lr * (1.0 - mu) / (1.0 - self.mu_product)
        self.p -= tmp2
        np.divide(self.exp_avg, tmp, out=tmp2)
        tmp2 *= self.lr * mu_next / (1.0 - self.mu_product * mu_next)
        self.p -= tmp2


class RAdam(_Moments):
    r"""Rectified Adam: with :math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`, an Adam step scaled by
    :math:`r_t` when :math:`\rho_t > 5`, else :math:`\theta \mathrel{-}= \eta\, m_t / (1-\beta_1^t)`."""

    def __init__(self, param, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(param, lr, betas, eps, weight_decay)

    def step(self, g):
        g = self._l2(g)
        self.t += 1
        t, b1, b2 = self.t, self.beta1, self.beta2
        self._moments(g)
        tmp = self.tmp
        bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        rho_t = rho_inf - 2.0 * t * b2**t / bc2
        if rho_t > 5.0:
            rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
            np.sqrt(self.exp_avg_sq, out=tmp)
            tmp += self.eps
            np.divide(self.exp_avg, tmp, out=tmp)
            tmp *= self.lr * rect * math.sqrt(bc2) / bc1
        else:
            np.multiply(self.exp_avg, self.lr / bc1, out=tmp)
        self.p -= tmp
