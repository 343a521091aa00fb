r"""Gradient transforms fused into the update: global-norm clipping, the non-finite guard and
annealed Gaussian noise, as options of every optimizer.

Each step, in this order (torch's order for clipping and ``maximize``):

.. math::

    \|g\| &= \Big(\sum_{\text{params}} \sum_i g_i^2\Big)^{1/2}
            && \text{one reduction pass (also tests every } g_i \text{ for NaN/inf)} \\
    c &= \min\!\big(1,\ \text{max\_norm} / (\|g\| + 10^{-6})\big)
            && \text{(clip\_grad\_norm; else } c = 1) \\
    \tilde g_j &= \pm\big(c\, g_j + \sigma_t z_j\big), \quad
    \sigma_t^2 = \eta / (1 + t)^\gamma
            && \text{(grad\_noise; } - \text{ for maximize)}

then the optimizer's rule on :math:`\tilde g`. :math:`c` goes into the kernel's table (column
0, the gradient scale) and :math:`\sigma_t z_j` is drawn inside the update kernel, so the
update pass is one read of :math:`g`, unchanged; the user's gradient arrays are never
written. :math:`t` is the number of completed steps (``opt.step_count``, what a schedule
sees), :math:`z_j` the counter-based deviate of element :math:`j` (its position in the
optimizer's parameter order) under the key of ``(seed, t)``: see
:mod:`fastopt.kernels.noise`. Neelakantan et al. (2015), seed 003, add noise with
:math:`\eta \in \{0.01, 0.3, 1\}`, :math:`\gamma = 0.55`.

With ``skip_nonfinite=True`` a step whose gradients hold any NaN or inf changes nothing (no
parameter, no state buffer, not ``step_count``); ``opt.skipped_steps`` counts such steps and
``opt.last_step_skipped`` tells about the last one. Without it a NaN propagates as in torch.
``opt.last_grad_norm`` is the norm of the last step's gradients whenever it was computed
(``clip_grad_norm`` or ``skip_nonfinite``).

Only a real NaN or inf skips a step: the test is a comparison per element, so finite float64
gradients near the largest double never count as non-finite. Their sum of squares can still
overflow (a norm above about 1.3e154): the norm is then ``inf``, as in
``torch.nn.utils.clip_grad_norm_``, and ``clip_grad_norm`` gives the same factor torch does,
``max_norm / (inf + 1e-6) = 0``: the step runs with a zero gradient (weight decay and momentum
still apply). ``skip_nonfinite`` does not skip it, since every gradient is finite.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from ._validation import check_array_type
from .kernels import _build, noise, reduce
from .kernels import _hyper as H

__all__ = ["GradTransforms", "clip_coefficient", "clip_grad_norm_", "grad_norm"]

#: torch.nn.utils.clip_grad_norm_'s guard against a zero norm.
CLIP_EPS = 1e-6


def _as_arrays(grads) -> list[np.ndarray]:
    arrays = [grads] if isinstance(grads, np.ndarray) else list(grads)
    for i, g in enumerate(arrays):
        if not isinstance(g, np.ndarray):
            raise TypeError(f"gradient {i} must be a NumPy array, got {type(g).__name__}")
        check_array_type(g, f"gradient {i}")
        if g.dtype not in (np.float32, np.float64):
            raise TypeError(f"gradient {i} has dtype {g.dtype}; expected float32 or float64")
    return arrays


def clip_coefficient(norm: float, max_norm: float) -> float:
    """torch's factor, ``min(1, max_norm / (norm + 1e-6))``; NaN stays NaN (as ``torch.clamp``)."""
    coef = max_norm / (norm + CLIP_EPS)
    return 1.0 if coef >= 1.0 else coef  # noqa: FURB136 (min(1.0, nan) would be 1.0)


def grad_norm(grads) -> float:
    """The global L2 norm of one array or a sequence of arrays (float64, thread-count independent)."""
    return math.sqrt(reduce.sumsq_all(_as_arrays(grads))[0])


def clip_grad_norm_(grads, max_norm: float, *, error_if_nonfinite: bool = False) -> float:
    r"""Scale gradients in place so that their global L2 norm is at most ``max_norm``.

    Like ``torch.nn.utils.clip_grad_norm_``: with :math:`\|g\|` the norm over all arrays,
    every array is multiplied by :math:`\min(1, \text{max\_norm} / (\|g\| + 10^{-6}))` and the
    norm *before* clipping is returned (a float, computed in float64). A NaN norm makes every
    gradient NaN, as in torch; ``error_if_nonfinite=True`` raises instead.

    This is a separate pass over the gradients; an optimizer's ``clip_grad_norm=max_norm``
    option does the same inside its update without writing the gradients.
    """
    arrays = _as_arrays(grads)
    max_norm = H.positive("max_norm", max_norm)
    for i, g in enumerate(arrays):
        if not g.flags.writeable:
            raise ValueError(f"gradient {i} is read-only; clip_grad_norm_ scales gradients in place")
    norm = math.sqrt(reduce.sumsq_all(arrays)[0])
    if error_if_nonfinite and not math.isfinite(norm):
        raise RuntimeError(f"The total norm of the gradients is {norm}, so they cannot be clipped "
                           "(error_if_nonfinite=True)")
    coef = clip_coefficient(norm, max_norm)
    if coef != 1.0:
        with np.errstate(invalid="ignore"):  # inf * 0 and NaN are torch's results too
            for g in arrays:
                np.multiply(g, g.dtype.type(coef), out=g)
    return norm


class GradTransforms:
    """The validated transform options of one optimizer (``opt.transforms``).

    Parameters
    ----------
    clip_grad_norm : float > 0 or None, the largest global L2 norm of a step's gradients
    skip_nonfinite : bool, skip a step whose gradients hold NaN or inf
    grad_noise : (eta, gamma) or None, noise variance :math:`\\eta / (1 + t)^\\gamma`
    seed : int in [0, 2**64) or None (a random seed, kept in ``seed`` so a run can be repeated)
    """

    __slots__ = ("_offsets", "clip_grad_norm", "grad_noise", "seed", "skip_nonfinite")

    def __init__(self, *, clip_grad_norm: float | None = None, skip_nonfinite: bool = False,
                 grad_noise: tuple[float, float] | None = None, seed: int | None = None):
        self.clip_grad_norm = None if clip_grad_norm is None else H.positive("clip_grad_norm", clip_grad_norm)
        self.skip_nonfinite = H.flag("skip_nonfinite", skip_nonfinite)
        if grad_noise is not None:
            eta, gamma = H.pair("grad_noise", grad_noise, "(eta, gamma)")
            grad_noise = (H.nonneg("grad_noise eta", eta), H.nonneg("grad_noise gamma", gamma))
        self.grad_noise = grad_noise
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
        elif isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.seed = int(seed)
        self._offsets: list[int] = []

    @property
    def active(self) -> bool:
        return self.clip_grad_norm is not None or self.skip_nonfinite or self.grad_noise is not None

    @property
    def extra_columns(self) -> int:
        """Table columns needed beyond the rule's: one for the noise standard deviation."""
        return 1 if self.grad_noise is not None else 0

    def noise_std(self, t: int) -> float:
        r""":math:`\sigma_t = \sqrt{\eta / (1 + t)^\gamma}` after ``t`` completed steps."""
        eta, gamma = self.grad_noise
        return math.sqrt(eta / (1.0 + t) ** gamma)

    def bind(self, sizes: Sequence[int]) -> None:
        """Record the parameters' sizes: element ``j`` of the noise stream is element
        ``j - offset`` of the parameter at ``offset`` in this order."""
        self._offsets = [0]
        for n in sizes:
            self._offsets.append(self._offsets[-1] + int(n))

    def begin_step(self, opt, grads: list) -> tuple[float, _NoiseStep | None] | None:
        """The gradient scale and noise of the coming step, or ``None`` when it is skipped.

        Sets ``opt.last_grad_norm``, ``opt.last_step_skipped`` and ``opt.skipped_steps``.
        """
        scale = 1.0
        if self.clip_grad_norm is not None or self.skip_nonfinite:
            total, finite = opt._backend.sumsq(grads)  # the host's or the GPU's reduction
            norm = math.sqrt(total)
            opt.last_grad_norm = norm
            if self.skip_nonfinite and not finite:
                opt.skipped_steps += 1
                opt.last_step_skipped = True
                return None
            if self.clip_grad_norm is not None:
                scale = clip_coefficient(norm, self.clip_grad_norm)
        opt.last_step_skipped = False
        step_noise = None
        if self.grad_noise is not None:
            std = self.noise_std(opt.step_count)
            if std > 0.0:
                step_noise = _NoiseStep(noise.stream_key(self.seed, opt.step_count), std, self._offsets)
        return scale, step_noise

    def __repr__(self) -> str:
        return (f"GradTransforms(clip_grad_norm={self.clip_grad_norm}, skip_nonfinite={self.skip_nonfinite}, "
                f"grad_noise={self.grad_noise}, seed={self.seed})")


class _NoiseStep:
    """One step's noise: its key and standard deviation; runs the noise variant of a kernel."""

    __slots__ = ("key", "offsets", "std")

    def __init__(self, key: np.uint64, std: float, offsets: list[int]):
        self.key, self.std, self.offsets = key, std, offsets

    def run(self, slot, rule: _build.Rule, grad: np.ndarray, sign: float) -> None:
        """Update ``slot`` (an optimizer's parameter) by ``rule`` with this step's noise."""
        slot.table[0, rule.ncols] = sign * self.std
        states = tuple(slot.flat_buffers[name] for name in rule.state)
        slot.backend.run_noise(rule, slot.flat, grad.reshape(-1), states, slot.bounds, slot.table, self.key,
                               self.offsets[slot.index])
