r"""Counter-based Gaussian noise: the same numbers for any thread count, chunking or device.

Deviate number :math:`j` of a step is a pure function of a 64-bit *key* (derived from the
user's seed and the step, :func:`stream_key`) and :math:`j` (the element's index in the
optimizer's parameter order); no generator state is carried between elements or threads.

Elements come in blocks of 32, and element :math:`j = 32b + r` (:math:`0 \le r < 32`) gets
one of the two deviates of hash number :math:`i = 16b + (r \bmod 16)` (Box-Muller, 1958): the
first for :math:`r < 16`, the second for :math:`r \ge 16`. So elements :math:`j` and
:math:`j + 16` share a hash, and a block's 16 hashes feed one 512-bit vector of float32 for
each half of the block, with no shuffles:

.. math::

    h &= \operatorname{mix64}(\text{key} + (i + 1)\,\gamma) \bmod 2^{64}
         \qquad (\text{SplitMix64's finalizer}, \ \gamma = \texttt{0x9E3779B97F4A7C15}) \\
    u &= (\lfloor h / 2^{32} \rfloor + 1) / 2^{32} \in (0, 1], \qquad
    \theta = 2\pi\,(h \bmod 2^{32}) / 2^{32} \\
    z_{32b + k} &= \sqrt{-2 \ln u}\,\cos\theta, \qquad z_{32b + 16 + k} = \sqrt{-2 \ln u}\,\sin\theta
    \qquad (i = 16b + k, \ 0 \le k < 16)

so :math:`z_j \sim \mathcal N(0, 1)`, independent, truncated at
:math:`|z| \le \sqrt{64 \ln 2} \approx 6.66` by the 32-bit :math:`u`.

The logarithm and the trigonometric functions are polynomials evaluated with the four
arithmetic operations only (:math:`\ln u` by an exact split :math:`u = x\,2^{-e}`,
:math:`x \in [\sqrt{1/2}, \sqrt 2)`, then :math:`\ln x` as a polynomial in :math:`x - 1`
(float32: near-minimax, degree 8, no division) or :math:`2\operatorname{atanh}((x-1)/(x+1))`
as a series (float64); :math:`\sin, \cos` on :math:`[-\pi/4, \pi/4)` after an exact integer
quadrant reduction, near-minimax of degree 7 and 6 for float32, Taylor for float64), so the
loop vectorizes on the CPU; the deviates are accurate to a few units in the last place of the
dtype. Every float constant is a NumPy scalar of the buffer's dtype (a Python float would
turn float32 math into float64), which is why :func:`generator` builds one set of functions
per dtype.

The noise kernels (``kernels._build``) draw a block's deviates inside the update loop, one
hash per two elements, so the arithmetic overlaps the loop's memory traffic; :func:`fill`
writes the deviates out with the same block loop (tests, benchmarks).

For the CUDA target: ``generator(dtype, split="compare")`` returns ``register_jitable``
functions that use nothing but arithmetic, comparisons and integer casts, so a ``numba.cuda``
kernel can call ``normal(key, j)`` (one thread per element) and get the CPU's numbers: the
CPU's default ``split="bitcast"`` reads the exponent bits instead, which is exact too (a test
checks the two agree bit for bit). Only LLVM's FMA contraction of the series can differ by an
ulp between targets. Run as plain Python (the CUDA simulator), NumPy warns about the uint64
wrap-around of the hash; the numbers are the same.
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
_EIGHTH_TURN_I = np.int64(1 << 29)
_TURN_MASK = np.uint64((1 << 30) - 1)

#: Elements per block and hashes (pairs) per block: element ``32b + k`` and ``32b + 16 + k``
#: share hash ``16b + k``.
BLOCK = 32
HALF_BLOCK = BLOCK // 2
_BLOCK = np.uint64(BLOCK)
_HALF_BLOCK = np.uint64(HALF_BLOCK)


@register_jitable
def mix64(z):
    """SplitMix64's finalizer: a bijection of uint64 that scrambles every bit."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


@register_jitable
def hash_counter(key, i):
    """The counter of hash number ``i``: ``key + (i + 1) * GOLDEN`` (mod 2**64); hash ``i + 1``'s
    is this plus ``GOLDEN``."""
    return key + (i + _U1) * _GOLDEN


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


#: The polynomials, per dtype. float64: Taylor series with enough terms for a relative error
#: below epsilon on the reduced ranges (|s| <= 0.172 for atanh, |t| <= pi/4 for sin and cos).
#: float32: near-minimax polynomials of lower degree (least squares on Chebyshev nodes,
#: Lawson-reweighted), absolute error < 1e-7 on the reduced ranges (checked in
#: ``tests/test_noise.py``):
#: ln(1 + f) = f - f^2/2 + f^3 P(f) on f in [sqrt(1/2) - 1, sqrt(2) - 1) (no division), and
#: sin t = t + t^3 S(t^2), cos t = 1 + t^2 C(t^2).
_LOG1P_F32 = (0.3333469033241272, -0.2498057335615158, 0.19910238683223724, -0.17166921496391296,
              0.16141173243522644, -0.10224143415689468)
_SIN_F32 = (-0.16666655242443085, 0.008332177996635437, -0.00019517297914717346)
_COS_F32 = (-0.49999895691871643, 0.04165629297494888, -0.0013597822980955243)
_COEFFS = {
    np.dtype(np.float32): ("poly", _LOG1P_F32, _SIN_F32, _COS_F32),
    np.dtype(np.float64): ("atanh", tuple(2.0 / (2 * k + 1) for k in range(11)),
                           tuple((-1) ** k / math.factorial(2 * k + 1) for k in range(1, 8)),
                           tuple((-1) ** k / math.factorial(2 * k) for k in range(1, 9))),
}


def _horner(var: str, names: list[str]) -> str:
    """``c0 + var * (c1 + var * (c2 + ...))`` as source."""
    expr = names[-1]
    for name in reversed(names[:-1]):
        expr = f"{name} + {var} * ({expr})"
    return expr


_PAIR_TEMPLATE = """
def pair_at(counter):
    h = mix64(counter)
    # ln u with u = x * 2**-e, x in [sqrt(1/2), sqrt(2)) (an exact split)
    x = (FLOAT(np.int64(h >> S32)) + ONE) * U_SCALE
{split}
    small = x < SQRT_HALF
    x = x + x if small else x
    e = e + ONE if small else e
{log}
    radius = math.sqrt(TWO * minus_log_u)
    # theta = quadrant * pi/2 + t, t in [-pi/4, pi/4), from the low 32 bits
    a = (h & LOW32) + EIGHTH_TURN
    quadrant = a >> S30
    t = FLOAT(np.int64(a & TURN_MASK) - EIGHTH_TURN_I) * ANGLE
    t2 = t * t
    sin_t = t + t * t2 * ({sin_series})
    cos_t = ONE + t2 * ({cos_series})
    odd = (quadrant & U1) != U0
    cos_theta = cos_t
    cos_theta = sin_t if odd else cos_theta
    sin_theta = sin_t
    sin_theta = cos_t if odd else sin_theta
    cos_theta = -cos_theta if ((quadrant + U1) & U2) != U0 else cos_theta
    sin_theta = -sin_theta if (quadrant & U2) != U0 else sin_theta
    return radius * cos_theta, radius * sin_theta
"""

#: The exponent split x -> (x * 2**e in [1/2, 1], e) of x in [2**-32, 1], two exact ways.
#: "compare": five compare-and-scale steps (any target, numba.cuda included);
#: "bitcast": the float's exponent bits (CPU; Numba has no scalar bitcast on CUDA). Both give
#: the same (x, e) after the sqrt(1/2) step, so the same deviates.
#: ln x on [sqrt(1/2), sqrt(2)): "atanh" (float64) 2 atanh((x-1)/(x+1)) as a series in s^2;
#: "poly" (float32) a polynomial in f = x - 1 (x - 1 is exact there), no division.
_LOG = {
    "atanh": """    s = (x - ONE) / (x + ONE)
    s2 = s * s
    minus_log_u = e * LN2 - s * ({series})""",
    "poly": """    f = x - ONE
    minus_log_u = e * LN2 - (f + f * f * (NEG_HALF + f * ({series})))""",
}
_SPLIT_COMPARE = "    e = ZERO\n" + "\n".join(
    f"    small = x < LIM{k}\n    x = x * MUL{k} if small else x\n    e = e + INC{k} if small else e"
    for k in (16, 8, 4, 2, 1))
_SPLIT_BITCAST = """    b = FLOAT_NP(x).view(UINT)
    e = EXP_HALF_F - FLOAT(b >> MANT_BITS)
    x = UINT((b & MANT_MASK) | HALF_BITS).view(FLOAT_NP)"""
_BITS = {np.dtype(np.float32): (np.uint32, 23, 126), np.dtype(np.float64): (np.uint64, 52, 1022)}


@functools.cache
def generator(dtype, split: str = "bitcast") -> tuple:
    """``(pair, normal, fill, pair_at)`` for buffers of ``dtype`` (float32 or float64).

    - ``pair(key, i) -> (z_a, z_b)``, the two deviates of hash number ``i`` (uint64);
    - ``normal(key, j) -> z_j`` for one element (uint64 ``j``: block ``j // 32``, see above);
    - ``fill(out, key, start)`` writes ``out[k] = z_{start + k}`` block by block (the CPU loop);
    - ``pair_at(counter)``: ``pair`` of ``counter = key + (i + 1) * GOLDEN``, inlined where it is
      called (the noise kernels step the counter by ``GOLDEN`` per hash: no multiply in the loop).

    ``split="compare"`` builds functions that compile for any Numba target (``numba.cuda``);
    the default ``"bitcast"`` is faster on the CPU. Both give the same numbers.
    """
    import numba

    dtype = np.dtype(dtype)
    if dtype not in _COEFFS:
        raise TypeError(f"noise is generated for float32 and float64, not {dtype}")
    if split not in ("bitcast", "compare"):
        raise ValueError(f"split must be 'bitcast' or 'compare', got {split!r}")
    c = dtype.type
    log_kind, log_coeffs, sin_coeffs, cos_coeffs = _COEFFS[dtype]
    uint, mant_bits, exp_half = _BITS[dtype]
    consts = {
        "ONE": c(1.0), "NEG_HALF": c(-0.5), "TWO": c(2.0), "ZERO": c(0.0), "LN2": c(math.log(2.0)),
        "U_SCALE": c(2.0**-32), "ANGLE": c(2.0 * math.pi / 2.0**32), "SQRT_HALF": c(math.sqrt(0.5)),
        "UINT": uint, "FLOAT_NP": dtype.type, "MANT_BITS": uint(mant_bits), "EXP_HALF_F": c(exp_half),
        "MANT_MASK": uint((1 << mant_bits) - 1), "HALF_BITS": uint(exp_half << mant_bits),
    }
    for k in (16, 8, 4, 2, 1):
        consts.update({f"LIM{k}": c(2.0**-k), f"MUL{k}": c(2.0**k), f"INC{k}": c(k)})
    for prefix, coeffs in (("LOG", log_coeffs), ("SIN", sin_coeffs), ("COS", cos_coeffs)):
        consts.update({f"{prefix}{k}": c(v) for k, v in enumerate(coeffs)})
    source = _PAIR_TEMPLATE.format(
        split=_SPLIT_BITCAST if split == "bitcast" else _SPLIT_COMPARE,
        log=_LOG[log_kind].format(series=_horner("s2" if log_kind == "atanh" else "f",
                                                 [f"LOG{k}" for k in range(len(log_coeffs))])),
        sin_series=_horner("t2", [f"SIN{k}" for k in range(len(sin_coeffs))]),
        cos_series=_horner("t2", [f"COS{k}" for k in range(len(cos_coeffs))]),
    )
    namespace = {
        "np": np, "math": math, "mix64": mix64, "FLOAT": numba.from_dtype(dtype),
        "U0": _U0, "U1": _U1, "U2": _U2, "S30": _S30, "S32": _S32, "LOW32": _LOW32,
        "EIGHTH_TURN": _EIGHTH_TURN, "EIGHTH_TURN_I": _EIGHTH_TURN_I, "TURN_MASK": _TURN_MASK, **consts,
    }
    exec(compile(source, f"<fastopt.kernels.noise {dtype} {split}>", "exec"), namespace)  # noqa: S102 (generated)
    # Numba's IR inliner mis-scopes the selects of a function inlined at several call sites in
    # one caller, so the vectorized loop gets the inlined copy and every other site a call.
    pair_at_inline = numba.njit(inline="always")(namespace["pair_at"])
    pair_at = register_jitable(namespace["pair_at"])

    @register_jitable
    def pair(key, i):
        return pair_at(hash_counter(key, i))

    @register_jitable  # not inlined by Numba: its selects would be mis-scoped at several call sites
    def normal(key, j):
        z0, z1 = pair(key, (j // _BLOCK) * _HALF_BLOCK + j % _HALF_BLOCK)
        return z1 if j % _BLOCK >= _HALF_BLOCK else z0

    @register_jitable
    def fill(out, key, start):
        n = np.uint64(out.size)
        head = min(n, (_BLOCK - start % _BLOCK) % _BLOCK)  # elements before the first whole block
        for k in range(head):
            out[k] = normal(key, start + k)
        nblocks = (n - head) // _BLOCK
        for b in range(nblocks):
            base = head + b * _BLOCK
            counter = hash_counter(key, (start + base) >> _U1)  # a block's first hash: its first element / 2
            for q in range(_HALF_BLOCK):
                z0, z1 = pair_at_inline(counter)
                out[base + q] = z0
                out[base + _HALF_BLOCK + q] = z1
                counter += _GOLDEN
        for k in range(head + nblocks * _BLOCK, n):
            out[k] = normal(key, start + k)

    return pair, normal, fill, pair_at_inline
