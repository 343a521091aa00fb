r"""``fastopt bench``: how close each optimizer comes to this machine's memory bandwidth.

An optimizer step reads the parameters, the gradients and every state buffer and writes the
parameters and the state back; for large buffers nothing else matters, so the time of a step is
bounded below by

.. math::

    t_{\min} = \frac{n \cdot b}{B}, \qquad b = (3 + 2k) \cdot \text{itemsize}

for :math:`n` parameters with :math:`k` state buffers (read :math:`p, g` and the :math:`k`
buffers, write :math:`p` and the :math:`k` buffers: Adam in float32 moves 28 bytes per
parameter, SGD with momentum 20, plain SGD 12) and a memory bandwidth :math:`B`. That is the
roofline.

:math:`B` is measured, for every row, by a **same-traffic probe** (:func:`traffic_kernel`): a
Numba loop over :math:`2 + k` arrays of :math:`n` elements of the row's dtype that reads all of
them and writes :math:`1 + k` of them, with one addition per element and no other arithmetic
(the addition keeps every load live), parallel over the same fixed chunks as fastopt's kernels
(``kernels._config.CHUNK``), on the run's threads, serial where fastopt's own kernel would be
(the same ``PARALLEL_MIN_WORK`` rule). So the probe moves exactly the bytes the step must move,
in the same pattern, and the fraction (``roofline``) compares like with like: a fused step can
approach 100% but not pass it. The probe is timed in turns with the optimizers of its row, so
that a neighbour's burst on a shared machine lowers both alike.

A row is **noisy** (:func:`noise_reason`) when the interleaved rounds of fastopt's step or of the
probe spread by more than ``NOISE_IQR`` (interquartile range over median), or when the fraction
exceeds ``MAX_FRACTION`` (a step cannot beat a loop that moves the same bytes and computes
nothing: such a number means the probe was slowed by something else). A noisy row prints
``noisy`` in the roofline column instead of a fraction, and the table says why; ``--json`` keeps
every number, the quartiles and the round count.

The output also says whether each row's footprint (its :math:`2 + k` arrays) fits in the
last-level cache (:func:`llc_bytes`, read from sysfs or ``lscpu``): a footprint that fits
measures the cache's bandwidth, not DRAM's. With no sizes given, :func:`plan` adds a DRAM-sized
row (the smallest power of ten past the default sizes whose footprint exceeds the LLC, for
``DRAM_RULES``) when the default sizes all fit and the memory it needs is available.

Every optimizer is timed through its public class (``fo.Adam([p]).step([g])``, Python
overhead included) beside :mod:`fastopt._numpy_baseline` (vectorized NumPy from the same
formula) and, when torch is installed, ``torch.optim``'s best CPU implementation
(``fused=True`` where it exists, else ``foreach=True``; ``n/a`` when torch has no such
optimizer), all with the same hyper-parameters on the same data. Each timing is the median of
``repeats`` rounds after ``warmup`` steps (which also excludes compilation and takes RAdam
past its first, SGD-like, steps).

Use it from Python as ``report = run(["adam"], [10**6])`` and ``print(format_table(report))``.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import inspect
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from numba import prange

from . import _numpy_baseline as nb
from .kernels import _cache, _config, _threads

#: Steps run before timing: compilation, page faults, and RAdam's switch to its adaptive
#: phase (step 6 with the default betas).
WARMUP = 6
#: Timed rounds per implementation; the median is reported, the quartiles give the spread.
REPEATS = 5
#: A timed round repeats the step until it lasts at least this long (seconds).
MIN_TIME = 0.02
#: ``fastopt bench`` with no options: a cache-sized and a larger buffer (plus, see
#: :func:`plan`, a DRAM-sized one where the last-level cache holds the larger).
DEFAULT_SIZES = (100_000, 10_000_000)
#: The rules of the extra DRAM-sized row (the least and the most traffic of the common rules);
#: one row each keeps the default run short.
DRAM_RULES = ("sgd", "adam")
#: A row whose fastopt or probe rounds spread more than this (IQR / median) is noisy.
NOISE_IQR = 0.10
#: A row whose roofline fraction exceeds this is noisy: no step beats its own traffic.
MAX_FRACTION = 1.05
#: Progress is shown only once a run has lasted this long (seconds).
PROGRESS_DELAY = 2.0
#: A run may use at most this fraction of the available memory.
MEMORY_FRACTION = 0.5
DTYPES = {"float32": np.float32, "float64": np.float64}


@dataclass(frozen=True)
class Spec:
    """One benchmarked optimizer: the class name (in fastopt and torch.optim), its options and
    the NumPy baseline that does the same work."""

    name: str
    cls: str
    options: dict
    baseline: type


SPECS = {
    s.name: s
    for s in [
        Spec("sgd", "SGD", {"lr": 1e-3}, nb.SGD),
        Spec("sgd_momentum", "SGD", {"lr": 1e-3, "momentum": 0.9}, nb.SGD),
        Spec("adagrad", "Adagrad", {"lr": 1e-2}, nb.Adagrad),
        Spec("adadelta", "Adadelta", {"lr": 1.0}, nb.Adadelta),
        Spec("rmsprop", "RMSprop", {"lr": 1e-2}, nb.RMSprop),
        Spec("adam", "Adam", {"lr": 1e-3}, nb.Adam),
        Spec("adamw", "AdamW", {"lr": 1e-3, "weight_decay": 1e-2}, nb.AdamW),
        Spec("adamax", "Adamax", {"lr": 2e-3}, nb.Adamax),
        Spec("nadam", "NAdam", {"lr": 2e-3}, nb.NAdam),
        Spec("radam", "RAdam", {"lr": 1e-3}, nb.RAdam),
    ]
}


def make_optimizer(spec: Spec, param: np.ndarray):
    """fastopt's optimizer for ``spec`` over the one array ``param``."""
    import fastopt as fo

    return getattr(fo, spec.cls)([param], **spec.options)


def state_buffers(spec: Spec, dtype=np.float32) -> int:
    """``k``: how many state arrays ``spec``'s fastopt optimizer keeps per parameter (read
    from a real optimizer's state, not from a table)."""
    return _count_buffers(make_optimizer(spec, np.zeros(4, dtype)), 4)


def _count_buffers(opt, n: int) -> int:
    return sum(isinstance(v, np.ndarray) and v.size == n for v in opt.state[0].values())


def bytes_per_param(k: int, dtype=np.float32) -> int:
    """Bytes a fused step moves per parameter: read p, g and ``k`` buffers, write p and them."""
    return (3 + 2 * k) * np.dtype(dtype).itemsize


# -- the roofline's denominator: a loop with exactly the step's traffic ------------------
_TRAFFIC_TEMPLATE = '''
def {fname}(p, g{state_args}):
    n = p.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        for i in range(np.uint64(lo), np.uint64(hi)):
{body}
'''


def _traffic_source(k: int, fname: str) -> str:
    """Reads p, g, s0..s{k-1}; writes p, s0..s{k-1}. One addition per element (g plus the last
    buffer, or p plus g when there is none) so that no load is dead; the buffers rotate."""
    pad = " " * 12
    states = [f"s{j}" for j in range(k)]
    if k == 0:
        body = [f"{pad}p[i] = p[i] + g[i]"]
    else:
        body = [f"{pad}{name}_i = {name}[i]" for name in ["p", *states]]
        body.append(f"{pad}p[i] = g[i] + s{k - 1}_i")
        body += [f"{pad}{name}[i] = {prev}_i" for name, prev in zip(states, ["p", *states])]
    return _TRAFFIC_TEMPLATE.format(fname=fname, state_args="".join(f", {s}" for s in states),
                                    body="\n".join(body))


@functools.cache
def traffic_kernel(k: int, parallel: bool) -> Callable:
    """The same-traffic probe for a rule with ``k`` state buffers: ``kernel(p, g, s_0, ...,
    s_{k-1})`` reads all ``2 + k`` arrays and writes ``1 + k`` (p and the buffers), element by
    element over fastopt's fixed chunks (``prange`` when ``parallel``), with one addition per
    element: :func:`bytes_per_param` ``(k)`` bytes per element. Compiled with fastopt's kernel
    settings (never ``fastmath=True``), from generated source, as ``kernels._build`` does."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k (state buffers) must be a non-negative integer, got {k!r}")
    digest = hashlib.sha256(_TRAFFIC_TEMPLATE.encode() + repr((k, _config.CHUNK)).encode()).hexdigest()[:10]
    fname = f"traffic_{k}_{'parallel' if parallel else 'serial'}_{digest}"
    namespace = {"np": np, "prange": prange, "CHUNK": _config.CHUNK, "__name__": __name__}
    exec(compile(_traffic_source(k, fname), __file__, "exec"), namespace)  # a real file: Numba can cache it
    kernel = _cache.jit(namespace[fname], parallel=parallel, fastmath=_config.FASTMATH,
                        error_model=_config.ERROR_MODEL, nogil=True)
    return _threads.ParallelKernel(kernel, lambda: traffic_kernel(k, False)) if parallel else kernel  # fork-safe


def traffic_parallel(k: int, n: int) -> bool:
    """Whether fastopt runs its parallel kernel for ``n`` elements of a rule with ``k`` state
    buffers (``kernels._build.use_parallel``: element-streams against ``PARALLEL_MIN_WORK``)."""
    return n * (3 + 2 * k) >= _config.PARALLEL_MIN_WORK


#: The probe's arrays start this many bytes apart modulo a page (5 cache lines), so that a store
#: to one and a load from the next never share their low 12 address bits: same-offset arrays
#: "4K-alias" and stall loads behind stores, which in cache cost the loop up to a third of its
#: speed (measured at 1e5 float32 with k = 2). The probe is the machine's bound, not an
#: unlucky layout's.
STAGGER_BYTES = 320


def traffic_arrays(k: int, n: int, dtype=np.float32) -> list[np.ndarray]:
    """The probe's ``2 + k`` arrays of ``n`` zeros: every page written (``np.zeros`` would leave
    the read-only gradient on the shared zero page, which reads from cache), array ``j``
    starting ``j * STAGGER_BYTES`` bytes further into its page than array 0."""
    itemsize = np.dtype(dtype).itemsize
    out = []
    for j in range(2 + k):
        shift = (j * STAGGER_BYTES) % 4096 // itemsize
        buf = np.full(n + 4096 // itemsize, 0, dtype)
        start = (shift - buf.ctypes.data % 4096 // itemsize) % (4096 // itemsize)
        out.append(buf[start:start + n])
    return out


def measure_bandwidth(n: int, dtype=np.float32, *, state_buffers: int = 0, repeats: int = REPEATS,
                      min_time: float = MIN_TIME) -> float:
    """Bytes per second of the same-traffic probe for ``state_buffers`` buffers over ``n``
    elements of ``dtype``: the best of ``repeats`` rounds, as STREAM reports (``fastopt bench``
    itself uses the median of rounds interleaved with the optimizers)."""
    arrays = traffic_arrays(state_buffers, n, dtype)
    kernel = traffic_kernel(state_buffers, traffic_parallel(state_buffers, n))
    seconds = time_per_call(lambda: kernel(*arrays), warmup=2, repeats=repeats, min_time=min_time,
                            statistic=min)
    return bytes_per_param(state_buffers, dtype) * n / seconds


def _axpy_parallel(x, y, a):
    for i in prange(x.size):
        x[i] += a * y[i]


def _axpy_serial(x, y, a):
    for i in range(x.size):
        x[i] += a * y[i]


@functools.cache
def axpy_kernel(parallel: bool) -> Callable:
    """``x += a * y`` in place as a Numba kernel (``fastopt info`` runs it to find the threading
    layer; the bench's roofline uses :func:`traffic_kernel`)."""
    kernel = _cache.jit(_axpy_parallel if parallel else _axpy_serial, parallel=parallel, fastmath=_config.FASTMATH,
                        error_model=_config.ERROR_MODEL, nogil=True)
    return _threads.ParallelKernel(kernel, lambda: axpy_kernel(False)) if parallel else kernel  # fork-safe


# -- the machine: last-level cache and memory --------------------------------------------
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}


def _parse_bytes(text: str) -> int | None:
    m = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def llc_bytes(sysfs: str = "/sys/devices/system/cpu/cpu0/cache") -> int | None:
    """The last-level cache of one CPU in bytes (the highest-level data or unified cache in
    ``sysfs``; else ``lscpu``'s, divided by its instances); ``None`` when neither says."""
    best = None
    try:
        entries = sorted(os.listdir(sysfs))
    except OSError:
        entries = []
    for entry in entries:
        try:
            with open(os.path.join(sysfs, entry, "level")) as f:
                level = int(f.read())
            with open(os.path.join(sysfs, entry, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(sysfs, entry, "size")) as f:
                size = _parse_bytes(f.read())
        except (OSError, ValueError):
            continue
        if kind in ("Data", "Unified") and size and (best is None or level > best[0]):
            best = (level, size)
    if best is not None:
        return best[1]
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for level in ("L3", "L2"):
        m = re.search(rf"^{level} cache:\s*([\d.]+\s*[A-Za-z]*)(?:\s*\((\d+) instances?\))?", out, re.M)
        if m and _parse_bytes(m.group(1)):
            return _parse_bytes(m.group(1)) // int(m.group(2) or 1)
    return None


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def footprint(k: int, n: int, dtype=np.float32) -> int:
    """Bytes a step touches: p, g and ``k`` buffers of ``n`` elements."""
    return (2 + k) * n * np.dtype(dtype).itemsize


def peak_memory(k: int, n: int, dtype=np.float32) -> int:
    """A bound on the memory one row of :func:`bench_rule` holds at once: the start values and
    the gradient, fastopt's and the probe's ``2 + k`` arrays, and the NumPy baseline's and
    torch's parameters, buffers and scratch (``k + 3`` arrays each)."""
    return (2 + 2 * (2 + k) + 2 * (k + 3)) * n * np.dtype(dtype).itemsize


@dataclass
class Plan:
    """The cases of a run (``(rule, n)`` in order) and what :func:`plan` decided and why."""

    cases: list[tuple[str, int]]
    llc_bytes: int | None
    available_memory: int | None
    dram_size: int | None = None
    notes: list[str] = field(default_factory=list)


def plan(rules: Sequence[str], sizes: Sequence[int] | None, dtype: str = "float32", *,
         llc: int | None = -1, available: int | None = -1) -> Plan:
    """The cases to run: every rule at every size. With ``sizes=None``, ``DEFAULT_SIZES`` and,
    when every rule's footprint at the largest default fits in the last-level cache, one
    DRAM-sized row for ``DRAM_RULES`` (those of ``rules``, else the first rule) at the
    smallest power of ten whose footprint does not, if its memory is available (else a note
    says why not). ``llc``/``available`` default (``-1``) to this machine's.

    Raises ``ValueError`` when a requested case would need more than ``MEMORY_FRACTION`` of
    the available memory.
    """
    llc = llc_bytes() if llc == -1 else llc
    available = available_memory() if available == -1 else available
    ks = {rule: state_buffers(SPECS[rule], DTYPES[dtype]) for rule in rules}
    budget = None if available is None else int(MEMORY_FRACTION * available)
    result = Plan([], llc, available)
    explicit = sizes is not None
    sizes = list(DEFAULT_SIZES if sizes is None else sizes)
    result.cases = [(rule, n) for rule in rules for n in sizes]
    if explicit:
        for rule, n in result.cases:
            need = peak_memory(ks[rule], n, DTYPES[dtype])
            if budget is not None and need > budget:
                raise ValueError(f"{rule} at n={n:,} needs ~{need / 1e9:.1f} GB, more than "
                                 f"{MEMORY_FRACTION:.0%} of the {available / 1e9:.1f} GB available")
        return result
    if llc is None:
        result.notes.append("last-level cache size unknown: no DRAM-sized row added")
        return result
    biggest = max(sizes)
    if any(footprint(ks[rule], biggest, DTYPES[dtype]) <= llc for rule in rules):
        dram_rules = [r for r in rules if r in DRAM_RULES] or list(rules[:1])
        n = 10 ** (len(str(biggest)))  # the next power of ten above the largest default
        while any(footprint(ks[r], n, DTYPES[dtype]) <= llc for r in dram_rules):
            n *= 10
        need = max(peak_memory(ks[r], n, DTYPES[dtype]) for r in dram_rules)
        if budget is not None and need > budget:
            result.notes.append(f"no DRAM-sized row: n={_size(n)} needs ~{need / 1e9:.1f} GB, "
                                f"{available / 1e9:.1f} GB available")
        else:
            result.dram_size = n
            result.cases += [(r, n) for r in dram_rules]
            result.notes.append(f"n={_size(n)}: DRAM-sized row for {', '.join(dram_rules)} "
                                "(--sizes to choose others)")
    return result


# -- timing -------------------------------------------------------------------------------
def time_rounds(fns: dict[str, Callable[[], object]], *, warmup: int = WARMUP, repeats: int = REPEATS,
                min_time: float = MIN_TIME) -> dict[str, list[float]]:
    """Seconds per call of each function in each of ``repeats`` rounds, timed in turns.

    Each function is called ``warmup`` times, then the number of calls that lasts ``min_time``
    is found by growing the count (as ``timeit`` does), so that microsecond steps are not lost
    in the clock's resolution; that calibration run is the first round. Then ``repeats - 1``
    more rounds each time every function once, in turn: on a machine shared with other work, a
    busy moment slows all of them alike instead of whichever happened to be running.
    """
    clock = time.perf_counter

    def run(fn, number: int) -> float:
        start = clock()
        for _ in range(number):
            fn()
        return clock() - start

    numbers, samples = {}, {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        number = 1
        elapsed = run(fn, number)
        while elapsed < min_time and number < 1 << 24:
            number *= 2 if elapsed <= 0 else max(2, min(10, int(1.2 * min_time / elapsed) + 1))
            elapsed = run(fn, number)
        numbers[name], samples[name] = number, [elapsed / number]
    for _ in range(max(repeats, 1) - 1):
        for name, fn in fns.items():
            samples[name].append(run(fn, numbers[name]) / numbers[name])
    return samples


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = WARMUP, repeats: int = REPEATS,
                     min_time: float = MIN_TIME, statistic: Callable = statistics.median) -> dict[str, float]:
    """Median (or ``statistic``) seconds per call of each function; see :func:`time_rounds`."""
    rounds = time_rounds(fns, warmup=warmup, repeats=repeats, min_time=min_time)
    return {name: statistic(values) for name, values in rounds.items()}


def time_per_call(fn: Callable[[], object], **kwargs) -> float:
    """Seconds per call of one function; see :func:`time_interleaved` for the keywords."""
    return time_interleaved({"fn": fn}, **kwargs)["fn"]


@dataclass(frozen=True)
class Spread:
    """The rounds of one timing: median, quartiles and count (seconds per call)."""

    median: float
    q1: float
    q3: float
    rounds: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Spread:
        if not samples:
            raise ValueError("no samples")
        s = sorted(samples)
        if len(s) == 1:
            return cls(s[0], s[0], s[0], 1)
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        return cls(statistics.median(s), q1, q3, len(s))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def relative_iqr(self) -> float:
        return self.iqr / self.median if self.median > 0 else float("inf")

    def to_dict(self) -> dict:
        return {**asdict(self), "iqr": self.iqr, "relative_iqr": self.relative_iqr}


def noise_reason(spreads: dict[str, Spread], fraction: float, *, max_iqr: float = NOISE_IQR,
                 max_fraction: float = MAX_FRACTION) -> str | None:
    """Why a roofline fraction cannot be trusted, or ``None``: the rounds of one of ``spreads``
    (the step's and the probe's) spread more than ``max_iqr`` (IQR over median; needs 3 rounds
    or more to judge), or the fraction is above ``max_fraction``."""
    reasons = []
    for name, s in spreads.items():
        if s.rounds >= 3 and s.relative_iqr > max_iqr:
            reasons.append(f"{name} rounds spread {s.relative_iqr:.0%} (IQR/median)")
    if fraction > max_fraction:
        reasons.append(f"{fraction:.0%} of a loop with the same traffic")
    return "; ".join(reasons) or None


# -- one optimizer ------------------------------------------------------------------------
@dataclass
class Row:
    """The timings of one optimizer at one size (seconds per step; ``None`` when not run).

    ``bandwidth`` is the same-traffic probe's bytes per second, timed in turns with this row
    (``probe`` seconds per call); ``spreads`` holds each timing's rounds (``fastopt``,
    ``probe``, ``numpy``, ``torch``); ``torch_impl`` is ``"fused"``, ``"foreach"``,
    ``"for-loop"``, ``"n/a"`` (torch has no such optimizer) or ``None`` (torch not run).
    """

    rule: str
    size: int
    dtype: str
    state_buffers: int
    bytes_per_param: int
    bandwidth: float
    fastopt: float
    numpy: float | None = None
    torch: float | None = None
    torch_impl: str | None = None
    probe: float | None = None
    spreads: dict[str, Spread] = field(default_factory=dict)
    fits_llc: bool | None = None

    @property
    def footprint_bytes(self) -> int:
        return footprint(self.state_buffers, self.size, self.dtype)

    @property
    def mparams_per_s(self) -> float:
        return self.size / self.fastopt / 1e6

    @property
    def gbps(self) -> float:
        return self.bytes_per_param * self.size / self.fastopt / 1e9

    @property
    def probe_gbps(self) -> float:
        return self.bandwidth / 1e9

    @property
    def roofline(self) -> float:
        """Fraction of the same-traffic probe's bandwidth this step reaches."""
        return self.gbps * 1e9 / self.bandwidth

    @property
    def noisy(self) -> str | None:
        """Why :attr:`roofline` is not to be trusted (see :func:`noise_reason`), or ``None``."""
        return noise_reason({k: s for k, s in self.spreads.items() if k in ("fastopt", "probe")}, self.roofline)

    @property
    def speedup_numpy(self) -> float | None:
        return None if self.numpy is None else self.numpy / self.fastopt

    @property
    def speedup_torch(self) -> float | None:
        return None if self.torch is None else self.torch / self.fastopt

    def to_dict(self) -> dict:
        derived = ("mparams_per_s", "gbps", "probe_gbps", "roofline", "noisy", "footprint_bytes",
                   "speedup_numpy", "speedup_torch")
        d = {**asdict(self), **{k: getattr(self, k) for k in derived}}
        d["spreads"] = {name: s.to_dict() for name, s in self.spreads.items()}
        return d


def _torch_optimizer(spec: Spec, param, grad):
    """``torch.optim``'s fastest CPU implementation of ``spec``: fused, else foreach, else its
    for-loop; ``(None, "n/a")`` when torch has no optimizer of that name or refuses the options."""
    import torch

    cls = getattr(torch.optim, spec.cls, None)
    if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)):
        return None, "n/a"
    tp = torch.from_numpy(param)
    tp.grad = torch.from_numpy(grad)
    accepted = inspect.signature(cls).parameters
    for flag in ("fused", "foreach", None):
        if flag is not None and flag not in accepted:
            continue
        try:
            opt = cls([tp], **spec.options, **({} if flag is None else {flag: True}))
            opt.step()  # some unsupported combinations only fail on the first step
        except (RuntimeError, TypeError, ValueError):
            continue
        return opt, flag or "for-loop"
    return None, "n/a"


def bench_rule(spec: Spec, n: int, dtype=np.float32, *, numpy: bool = True,
               torch: bool = True, warmup: int = WARMUP, repeats: int = REPEATS,
               min_time: float = MIN_TIME, seed: int = 0, llc: int | None = None) -> Row:
    """Time ``spec`` on ``n`` parameters: the same-traffic probe, fastopt, the NumPy baseline
    and torch, in turns. ``llc``: the last-level cache in bytes, for :attr:`Row.fits_llc`."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n, dtype=np.float32).astype(dtype, copy=False)
    grad = rng.standard_normal(n, dtype=np.float32).astype(dtype, copy=False)

    opt = make_optimizer(spec, p0.copy())
    k = _count_buffers(opt, n)
    probe_arrays = traffic_arrays(k, n, dtype)
    steps = {"probe": functools.partial(traffic_kernel(k, traffic_parallel(k, n)), *probe_arrays),
             "fastopt": functools.partial(opt.step, [grad])}
    if numpy:
        steps["numpy"] = functools.partial(spec.baseline(p0.copy(), **spec.options).step, grad)
    torch_impl = None
    if torch and torch_available():
        topt, torch_impl = _torch_optimizer(spec, p0.copy(), grad)
        if topt is not None:
            steps["torch"] = topt.step  # torch.optim steps run without autograd
    rounds = time_rounds(steps, warmup=warmup, repeats=repeats, min_time=min_time)
    steps = opt = probe_arrays = topt = None  # free every buffer before the next case allocates its own
    gc.collect()
    spreads = {name: Spread.of(values) for name, values in rounds.items()}
    itemsize_dtype = np.dtype(dtype)
    b = bytes_per_param(k, itemsize_dtype)
    median = {name: s.median for name, s in spreads.items()}
    return Row(spec.name, n, itemsize_dtype.name, k, b, b * n / median["probe"], median["fastopt"],
               median.get("numpy"), median.get("torch"), torch_impl, median["probe"], spreads,
               None if llc is None else footprint(k, n, itemsize_dtype) <= llc)


@functools.cache
def torch_available() -> bool:
    """Whether torch imports (checked once; a broken install counts as absent)."""
    try:
        import torch  # noqa: F401
    except (ImportError, OSError):  # OSError: a torch whose shared libraries do not load
        return False
    return True


# -- the whole run ------------------------------------------------------------------------
@dataclass
class Report:
    """Everything one ``fastopt bench`` run measured, with the machine it ran on."""

    machine: dict
    dtype: str
    threads: int
    bandwidth: dict[int, float]  # size -> median over the rows of that size of their probe's bytes/s
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def noisy_rows(self) -> list[Row]:
        return [r for r in self.rows if r.noisy]

    def to_dict(self) -> dict:
        return {
            "fastopt_version": _version(),
            "machine": self.machine,
            "dtype": self.dtype,
            "threads": self.threads,
            "thresholds": {"noise_iqr": NOISE_IQR, "max_fraction": MAX_FRACTION},
            "bandwidth": [{"size": n, "bytes_per_s": b, "gbps": b / 1e9} for n, b in self.bandwidth.items()],
            "results": [r.to_dict() for r in self.rows],
            "noisy": bool(self.noisy_rows),
            "notes": self.notes,
            "seconds": self.seconds,
        }


def _version() -> str:
    from . import __version__

    return __version__


def cpu_name() -> str:
    """The processor's marketing name where the OS tells it, else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], check=False,
                                  capture_output=True, text=True, timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def machine_info(llc: int | None = None, available: int | None = None) -> dict:
    import numba

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "numba_threads": numba.get_num_threads(),
            "llc_bytes": llc, "available_memory_bytes": available,
            "platform": platform.platform(), "python": platform.python_version()}


class _PlainProgress:
    """What ``fastopt bench`` shows when tqdm is not installed: one line on ``stream``,
    rewritten in place (``[3/20] adam n=1e7``), from ``delay`` seconds into the run, ended
    with a newline when closed."""

    def __init__(self, total: int, stream=None, delay: float | None = None):
        self.total, self.done, self.label = total, 0, ""
        self.stream = sys.stderr if stream is None else stream
        self.start, self.shown = time.perf_counter(), False
        self.delay = PROGRESS_DELAY if delay is None else delay

    def _draw(self) -> None:
        if self.shown or time.perf_counter() - self.start >= self.delay:
            self.shown = True
            print(f"\r\033[K[{self.done}/{self.total}] {self.label}", end="", file=self.stream, flush=True)

    def set_description(self, label: str) -> None:
        self.label = label
        self._draw()

    def update(self, k: int = 1) -> None:
        self.done += k
        self._draw()

    def close(self) -> None:
        if self.shown:
            print(file=self.stream, flush=True)


def progress_bar(total: int, enabled: bool = True, delay: float | None = None):
    """A tqdm bar on stderr if tqdm is installed, else a one-line counter; either appears only
    after ``delay`` seconds (default ``PROGRESS_DELAY``: short runs stay silent); ``None`` when
    disabled."""
    if not enabled:
        return None
    delay = PROGRESS_DELAY if delay is None else delay
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, delay=delay)
    return tqdm(total=total, unit="case", file=sys.stderr, leave=False, dynamic_ncols=True, delay=delay)


def run(rules: Sequence[str] = tuple(SPECS), sizes: Sequence[int] | None = None, dtype: str = "float32", *,
        threads: int | None = None, numpy: bool = True, torch: bool = True, repeats: int = REPEATS,
        warmup: int = WARMUP, min_time: float = MIN_TIME, progress: bool = False,
        llc: int | None = -1, available: int | None = -1) -> Report:
    """Every case of :func:`plan` (every rule at every size; ``sizes=None``: the defaults and
    maybe a DRAM-sized row), each beside its same-traffic probe; see the module docstring.

    ``threads`` sets Numba's (and torch's) thread count for the run and restores it after.
    Every argument is checked before anything is allocated or timed.
    """
    import numba

    unknown = [r for r in rules if r not in SPECS]
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(unknown)}; expected some of {', '.join(SPECS)}")
    if not rules:
        raise ValueError("rules must name at least one optimizer")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if sizes is not None and (not sizes or any(isinstance(n, bool) or int(n) != n or n < 1 for n in sizes)):
        raise ValueError(f"sizes must be positive integers, got {list(sizes)}")
    if threads is not None and not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                         f"(NUMBA_NUM_THREADS), got {threads}")
    sizes = None if sizes is None else [int(n) for n in sizes]
    cases = plan(rules, sizes, dtype, llc=llc, available=available)
    np_dtype = DTYPES[dtype]
    use_torch = torch and torch_available()

    previous = numba.get_num_threads()
    previous_torch = None
    if threads is not None:
        numba.set_num_threads(threads)
        if use_torch:
            import torch as _torch

            previous_torch = _torch.get_num_threads()
            _torch.set_num_threads(threads)
    start = time.perf_counter()
    bar = progress_bar(len(cases.cases), progress)
    try:
        report = Report(machine_info(cases.llc_bytes, cases.available_memory), dtype, numba.get_num_threads(),
                        {}, notes=list(cases.notes))
        for rule, n in cases.cases:
            if bar is not None:
                bar.set_description(f"{rule} n={_size(n)}")
            report.rows.append(bench_rule(SPECS[rule], n, np_dtype, numpy=numpy, torch=use_torch,
                                          warmup=warmup, repeats=repeats, min_time=min_time,
                                          llc=cases.llc_bytes))
            if bar is not None:
                bar.update(1)
        for n in dict.fromkeys(n for _, n in cases.cases):
            report.bandwidth[n] = statistics.median(r.bandwidth for r in report.rows if r.size == n)
    finally:
        if bar is not None:
            bar.close()
        numba.set_num_threads(previous)
        if previous_torch is not None:
            import torch as _torch

            _torch.set_num_threads(previous_torch)
    report.seconds = time.perf_counter() - start
    return report


# -- output -------------------------------------------------------------------------------
def _size(n: int) -> str:
    exponent = int(np.floor(np.log10(n)))
    return f"1e{exponent}" if n == 10**exponent else f"{n:,}"


def _mib(b: int | None) -> str:
    return "unknown" if b is None else f"{b / (1 << 20):,.0f} MiB"


def format_table(report: Report) -> str:
    """The report as a plain-text table (what ``fastopt bench`` prints)."""
    m = report.machine
    lines = [
        (f"fastopt {_version()} bench: {m['cpu']}, {m['cores']} cores, {report.threads} Numba threads, "
         f"{report.dtype}, last-level cache {_mib(m.get('llc_bytes'))}"),
        "roofline probe: a loop with each rule's own traffic (read 2+k, write 1+k arrays), timed in turns "
        "with the row; median per size: "
        + ", ".join(f"{b / 1e9:.1f} GB/s at n={_size(n)}" for n, b in report.bandwidth.items()),
        "",
    ]
    header = ("optimizer", "params", "B/param", "cache", "ms/step", "Mparam/s", "GB/s", "probe GB/s", "roofline",
              "spread", "vs NumPy", "vs torch")
    table = []
    for r in report.rows:
        if r.torch_impl == "n/a":
            torch_col = "n/a"
        else:
            torch_col = "-" if r.speedup_torch is None else f"{r.speedup_torch:.2f}x {r.torch_impl}"
        spread = max((r.spreads[k].relative_iqr for k in ("fastopt", "probe") if k in r.spreads), default=0.0)
        cache = "-" if r.fits_llc is None else ("LLC" if r.fits_llc else "DRAM")
        table.append((r.rule, _size(r.size), str(r.bytes_per_param), cache, f"{r.fastopt * 1e3:.3f}",
                      f"{r.mparams_per_s:,.0f}", f"{r.gbps:.1f}", f"{r.probe_gbps:.1f}",
                      "noisy" if r.noisy else f"{r.roofline:.0%}", f"{spread:.0%}",
                      "-" if r.speedup_numpy is None else f"{r.speedup_numpy:.2f}x", torch_col))
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    left = {0, 3, 11}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines.append(fmt(header))
    lines.append(fmt(["-" * w for w in widths]))
    lines.extend(fmt(row) for row in table)
    lines.append("")
    noisy = report.noisy_rows
    if noisy:
        lines.append(f"NOISY RUN: {len(noisy)} of {len(report.rows)} rows cannot be trusted (another process "
                     "is competing for the cores or memory?); run again on a quieter machine, or with --threads 1:")
        lines.extend(f"  {r.rule} n={_size(r.size)}: {r.noisy}" for r in noisy)
        lines.append("")
    lines.extend(report.notes)
    lines.append(
        "cache: whether the row's arrays (p, g and k buffers) fit in the last-level cache; ms/step: median "
        "fastopt step; GB/s: bytes a fused step must move (B/param) per second; probe GB/s: the same-traffic "
        "loop's; roofline: GB/s over probe GB/s ('noisy' when the rounds spread more than "
        f"{NOISE_IQR:.0%} or it exceeds {MAX_FRACTION:.0%}); spread: the larger IQR/median of fastopt's and the "
        "probe's rounds; vs: the other's time over fastopt's (n/a: torch has no such optimizer). "
        f"{report.seconds:.0f} s.")
    return "\n".join(lines)


# -- pytest-benchmark ---------------------------------------------------------------------
#: Rounds of the probe in :func:`record_throughput` (one call each).
PYTEST_PROBE_ROUNDS = 25


def probe_rounds(k: int, n: int, dtype=np.float32, *, parallel: bool | None = None, repeats: int = REPEATS,
                 min_time: float = MIN_TIME) -> Spread:
    """The same-traffic probe for ``k`` state buffers over ``n`` elements of ``dtype``, timed
    now: its rounds (seconds per call). ``parallel`` defaults to what fastopt's kernel would do."""
    parallel = traffic_parallel(k, n) if parallel is None else parallel
    arrays = traffic_arrays(k, n, dtype)
    kernel = traffic_kernel(k, parallel)
    rounds = time_rounds({"probe": lambda: kernel(*arrays)}, warmup=2, repeats=repeats, min_time=min_time)
    return Spread.of(rounds["probe"])


def record_throughput(benchmark, n: int, *, state_buffers: int | None, dtype=np.float32,
                      bytes_per_param: int | None = None, calls_per_round: int = 1,
                      parallel: bool | None = None, against: str | None = None) -> dict:
    """Put a step's throughput into a pytest-benchmark ``benchmark.extra_info``; call it after
    ``benchmark(step)``. Returns what it recorded.

    Always: ``params`` (``n``), ``dtype``, ``state_buffers`` (``k``), ``bytes_per_param`` (default
    :func:`bytes_per_param`: what a fused step must move) and ``roofline_against``. When the
    benchmark ran timed (not ``--benchmark-disable``), from its median round (divided by
    ``calls_per_round``): ``params_per_s``, ``gb_per_s``, and, timed right after the benchmark
    on fresh arrays of the same size and dtype with this run's threads (median of
    ``PYTEST_PROBE_ROUNDS`` rounds of one call, as pytest-benchmark's are), the same-traffic
    probe's ``probe_gb_per_s`` and ``roofline`` (``gb_per_s`` over it), both ``None`` when
    ``state_buffers`` is ``None`` (no such loop applies: say which denominator in ``against``);
    ``noisy``: :func:`noise_reason` for the benchmark's and the probe's rounds, or ``None``.
    """
    dtype = np.dtype(dtype)
    if bytes_per_param is None:
        if state_buffers is None:
            raise ValueError("bytes_per_param is needed when state_buffers is None")
        bytes_per_param = (3 + 2 * state_buffers) * dtype.itemsize  # the function of that name, shadowed
    info = {"params": n, "dtype": dtype.name, "state_buffers": state_buffers, "bytes_per_param": bytes_per_param,
            "roofline_against": against or (f"same-traffic loop, k={state_buffers}" if state_buffers is not None
                                            else "none")}
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if not getattr(benchmark, "disabled", False) and stats is not None:
        seconds = stats.median / calls_per_round
        gbps = bytes_per_param * n / seconds / 1e9
        spreads = {"step": Spread(stats.median, stats.q1, stats.q3, stats.rounds)}
        probe_gbps = fraction = None
        if state_buffers is not None:
            # one call per round and many rounds, like pytest-benchmark's own: a round as long
            # as fastopt bench's (20 ms) would include the preemptions a short one escapes
            spreads["probe"] = probe_rounds(state_buffers, n, dtype, parallel=parallel, repeats=PYTEST_PROBE_ROUNDS,
                                            min_time=0.0)
            probe_gbps = bytes_per_param * n / spreads["probe"].median / 1e9
            fraction = gbps / probe_gbps
        info.update(params_per_s=n / seconds, gb_per_s=gbps, probe_gb_per_s=probe_gbps, roofline=fraction,
                    noisy=noise_reason(spreads, 0.0 if fraction is None else fraction))
    benchmark.extra_info.update(info)
    return info
