r"""Counter-based Gaussian noise: the same numbers for any thread count, chunking or device.

Deviate number :math:`j` of a step is a pure function of a 64-bit *key* (derived from the
user's seed and the step, :func:`stream_key`) and :math:`j` (the element's index in the
optimizer's parameter order); no generator state is carried between elements or threads.

Elements come in pairs :math:`(2i, 2i + 1)` that share one 64-bit hash (Box-Muller, 1958):

.. math::

    h &= \operatorname{mix64}(\text{key} + (i + 1)\,\gamma) \bmod 2^{64}
         \qquad (\text{SplitMix64's finalizer}, \ \gamma = \texttt{0x9E3779B97F4A7C15}) \\
    u &= (\lfloor h / 2^{32} \rfloor + 1) / 2^{32} \in (0, 1], \qquad
    \theta = 2\pi\,(h \bmod 2^{32}) / 2^{32} \\
    z_{2i} &= \sqrt{-2 \ln u}\,\cos\theta, \qquad z_{2i+1} = \sqrt{-2 \ln u}\,\sin\theta

so :math:`z_j \sim \mathcal N(0, 1)`, independent, truncated at
:math:`|z| \le \sqrt{64 \ln 2} \approx 6.66` by the 32-bit :math:`u`.

The logarithm and the trigonometric functions are series evaluated with the four arithmetic
operations only (:math:`\ln u` by exact range reduction to :math:`[\sqrt{1/2}, \sqrt 2)` and
:math:`2\operatorname{atanh}`; :math:`\sin, \cos` on :math:`[-\pi/4, \pi/4)` after an exact
integer quadrant reduction), so the loop vectorizes on the CPU and compiles unchanged with
``numba.cuda``; the deviates are accurate to about one unit in the last place of the dtype.
Every float constant is a NumPy scalar of the buffer's dtype (a Python float would turn float32
math into float64), which is why :func:`generator` builds one set of functions per dtype.

For the CUDA target: :func:`mix64` and the functions of :func:`generator` are
``register_jitable``, so a ``numba.cuda`` kernel can call ``normal(key, j)`` directly.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba.extending import register_jitable

#: SplitMix64's increment (the golden ratio in 64 bits) and finalizer multipliers.
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
MASK64 = (1 << 64) - 1

_GOLDEN = np.uint64(GOLDEN)
_MIX1 = np.uint64(MIX1)
_MIX2 = np.uint64(MIX2)
_S27, _S30, _S31, _S32 = (np.uint64(v) for v in (27, 30, 31, 32))
_U0, _U1, _U2 = np.uint64(0), np.uint64(1), np.uint64(2)
_LOW32 = np.uint64(0xFFFFFFFF)
_EIGHTH_TURN = np.uint64(1 << 29)
_QUARTER_TURN = np.int64(1 << 30)


@register_jitable
def mix64(z):
    """SplitMix64's finalizer: a bijection of uint64 that scrambles every bit."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def mix64_host(z: int) -> int:
    """:func:`mix64` on Python integers (for keys and for tests)."""
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def stream_key(seed: int, step: int) -> np.uint64:
    """The key of one step's noise: ``mix64(mix64(seed) + (step + 1) * GOLDEN)``.

    Distinct (seed, step) give unrelated keys; element streams of two keys overlap with
    probability about ``n / 2**64``.
    """
    return np.uint64(mix64_host(mix64_host(seed) + (step + 1) * GOLDEN))


#: Series lengths per dtype: enough terms for a relative error below the dtype's epsilon
#: on the reduced ranges (|s| <= 0.172 for atanh, |t| <= pi/4 for sin and cos).
_TERMS = {np.dtype(np.float32): (5, 5, 6), np.dtype(np.float64): (11, 8, 9)}


def _horner(var: str, names: list[str]) -> str:
    """``c0 + var * (c1 + var * (c2 + ...))`` as source."""
    expr = names[-1]
    for name in reversed(names[:-1]):
        expr = f"{name} + {var} * ({expr})"
    return expr


_PAIR_TEMPLATE = '''
def pair(key, i):
    h = mix64(key + (i + U1) * GOLDEN)
    # ln u by exact scaling to [sqrt(1/2), sqrt(2)): u = x * 2**-e
    x = (FLOAT(np.int64(h >> S32)) + ONE) * U_SCALE
    e = ZERO
{reduce}
    s = (x - ONE) / (x + ONE)
    s2 = s * s
    minus_log_u = e * LN2 - s * ({log_series})
    radius = math.sqrt(TWO * minus_log_u)
    # theta = quadrant * pi/2 + t, t in [-pi/4, pi/4), from the low 32 bits
    a = h & LOW32
    quadrant = (a + EIGHTH_TURN) >> S30
    t = FLOAT(np.int64(a) - np.int64(quadrant) * QUARTER_TURN) * ANGLE
    t2 = t * t
    sin_t = t * ({sin_series})
    cos_t = {cos_series}
    odd = (quadrant & U1) != U0
    cos_theta = cos_t
    cos_theta = sin_t if odd else cos_theta
    sin_theta = sin_t
    sin_theta = cos_t if odd else sin_theta
    cos_theta = -cos_theta if ((quadrant + U1) & U2) != U0 else cos_theta
    sin_theta = -sin_theta if (quadrant & U2) != U0 else sin_theta
    return radius * cos_theta, radius * sin_theta
'''


@functools.cache
def generator(dtype) -> tuple:
    """``(pair, normal, fill)`` for buffers of ``dtype`` (float32 or float64).

    - ``pair(key, i) -> (z_2i, z_2i+1)``, the two deviates of hash number ``i`` (uint64);
    - ``normal(key, j) -> z_j`` for one element (uint64 ``j``);
    - ``fill(out, key, start)`` writes ``out[k] = z_{start + k}`` pair by pair (the CPU path).
    """
    dtype = np.dtype(dtype)
    if dtype not in _TERMS:
        raise TypeError(f"noise is generated for float32 and float64, not {dtype}")
    c = dtype.type
    nlog, nsin, ncos = _TERMS[dtype]
    consts = {
        "ONE": c(1.0), "TWO": c(2.0), "ZERO": c(0.0), "LN2": c(math.log(2.0)),
        "U_SCALE": c(2.0**-32), "ANGLE": c(2.0 * math.pi / 2.0**32), "SQRT_HALF": c(math.sqrt(0.5)),
    }
    consts.update({f"LOG{k}": c(2.0 / (2 * k + 1)) for k in range(nlog)})
    consts.update({f"SIN{k}": c((-1) ** k / math.factorial(2 * k + 1)) for k in range(nsin)})
    consts.update({f"COS{k}": c((-1) ** k / math.factorial(2 * k)) for k in range(ncos)})
    reduce = []
    for shift in (16, 8, 4, 2, 1):  # x in [2**-32, 1] -> [1/2, 1], exactly
        consts.update({f"LIM{shift}": c(2.0**-shift), f"MUL{shift}": c(2.0**shift), f"INC{shift}": c(shift)})
        reduce.append(f"    small = x < LIM{shift}\n    x = x * MUL{shift} if small else x\n"
                      f"    e = e + INC{shift} if small else e")
    reduce.append("    small = x < SQRT_HALF\n    x = x + x if small else x\n    e = e + ONE if small else e")
    source = _PAIR_TEMPLATE.format(
        reduce="\n".join(reduce),
        log_series=_horner("s2", [f"LOG{k}" for k in range(nlog)]),
        sin_series=_horner("t2", [f"SIN{k}" for k in range(nsin)]),
        cos_series=_horner("t2", [f"COS{k}" for k in range(ncos)]),
    )
    import numba

    namespace = {
        "np": np, "math": math, "mix64": mix64, "FLOAT": numba.from_dtype(dtype), "GOLDEN": _GOLDEN,
        "U0": _U0, "U1": _U1, "U2": _U2, "S30": _S30, "S32": _S32, "LOW32": _LOW32,
        "EIGHTH_TURN": _EIGHTH_TURN, "QUARTER_TURN": _QUARTER_TURN, **consts,
    }
    exec(compile(source, f"<fastopt.kernels.noise pair {dtype}>", "exec"), namespace)  # noqa: S102 (generated)
    # Numba's IR inliner mis-scopes the selects of a function inlined at several call sites in
    # one caller, so the vectorized loop gets the inlined copy and every other site a call.
    pair_inline = numba.njit(inline="always")(namespace["pair"])
    pair = register_jitable(namespace["pair"])

    @register_jitable(inline="always")
    def normal(key, j):
        z0, z1 = pair(key, j >> _U1)
        return z1 if (j & _U1) != _U0 else z0

    @register_jitable
    def fill(out, key, start):
        n = np.uint64(out.size)
        k = _U0
        if n == _U0:
            return
        if (start & _U1) != _U0:  # an odd first element: the second deviate of its pair
            z0, z1 = pair(key, start >> _U1)
            out[k] = z1
            k = _U1
        first = (start + k) >> _U1
        npairs = (n - k) >> _U1
        for q in range(npairs):
            i = np.uint64(q)
            z0, z1 = pair_inline(key, first + i)
            out[k + _U2 * i] = z0
            out[k + _U2 * i + _U1] = z1
        k = k + _U2 * npairs
        if k < n:  # an even last element: the first deviate of its pair
            z0, z1 = pair(key, (start + k) >> _U1)
            out[k] = z0

    return pair, normal, fill
