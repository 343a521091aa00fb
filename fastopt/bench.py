r"""``fastopt bench``: how close each optimizer comes to this machine's memory bandwidth.

An optimizer step reads the parameters, the gradients and every state buffer and writes the
parameters and the state back; for large buffers nothing else matters, so the time of a step is
bounded below by

.. math::

    t_{\min} = \frac{n \cdot b}{B}, \qquad b = (3 + 2k) \cdot \text{itemsize}

for :math:`n` parameters with :math:`k` state buffers (read :math:`p, g` and the :math:`k`
buffers, write :math:`p` and the :math:`k` buffers: Adam in float32 moves 28 bytes per
parameter, SGD with momentum 20, plain SGD 12) and a memory bandwidth :math:`B`. That is the
roofline. :math:`B` is measured by an in-place ``x += a * y`` pass written as a Numba
``prange`` kernel (12 bytes per float32 element) over the same memory footprint as the
optimizer's arrays (two arrays of :math:`n(2 + k)/2` elements against :math:`2 + k` arrays of
:math:`n`), so that a buffer that fits in cache is compared with the cache's bandwidth and a
large one with DRAM's: on a machine with a large last-level cache the bandwidth changes with
the footprint (here 1e7 float32 Adam, 160 MB, sees ~60 GB/s where an 80 MB probe sees ~76),
and a probe on a smaller footprint than the optimizer's would flatter the roofline. Serial or
parallel by the rule fastopt itself uses, ``_build.use_parallel``. The probe is timed in
turns with the optimizers of each row, so that a neighbour's burst on a shared machine (which
takes memory bandwidth as well as cores) lowers both alike; the header shows the median of
the rows' probes. A fraction above 100% happens for small buffers, where a launch's fixed cost
weighs more on the probe's 3 streams than on an optimizer's 5 to 9; read the large sizes.

Every optimizer is timed through its public class (``fo.Adam([p]).step([g])``, Python
overhead included) beside :mod:`fastopt._numpy_baseline` (vectorized NumPy from the same
formula) and, when torch is installed, ``torch.optim``'s best CPU implementation
(``fused=True`` where it exists, else ``foreach=True``), all with the same hyper-parameters on
the same data. Each timing is the median of ``repeats`` runs after ``warmup`` steps (which
also excludes compilation and takes RAdam past its first, SGD-like, steps); the probe and the
three implementations are timed in turns, so that a busy moment hits all of them.

Use it from Python as ``report = run(["adam"], [10**6])`` and ``print(format_table(report))``.
"""

from __future__ import annotations

import functools
import gc
import inspect
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from numba import njit, prange

from . import _numpy_baseline as nb
from .kernels import _config, _threads

#: Steps run before timing: compilation, page faults, and RAdam's switch to its adaptive
#: phase (step 6 with the default betas).
WARMUP = 6
#: Timed runs per implementation; the median is reported.
REPEATS = 5
#: A timed run repeats the step until it lasts at least this long (seconds).
MIN_TIME = 0.02
#: ``fastopt bench`` with no options: a cache-sized and a memory-sized buffer.
DEFAULT_SIZES = (100_000, 10_000_000)
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


# -- the roofline's denominator -----------------------------------------------------------
def _axpy_parallel(x, y, a):
    for i in prange(x.size):
        x[i] += a * y[i]


def _axpy_serial(x, y, a):
    for i in range(x.size):
        x[i] += a * y[i]


@functools.cache
def axpy_kernel(parallel: bool) -> Callable:
    """``x += a * y`` in place as a Numba kernel: reads x and y, writes x (3 words/element).

    Compiled with fastopt's kernel settings. The serial version is what fastopt itself runs
    below ``PARALLEL_MIN_WORK`` element-streams, so small buffers are compared like with like.
    (Two functions, not one compiled twice: Numba's cache does not key on ``parallel``.)
    """
    kernel = njit(parallel=parallel, cache=_config.cache_enabled(), fastmath=_config.FASTMATH,
                  error_model=_config.ERROR_MODEL, nogil=True)(_axpy_parallel if parallel else _axpy_serial)
    return _threads.ParallelKernel(kernel, lambda: axpy_kernel(False)) if parallel else kernel  # fork-safe


def measure_bandwidth(n: int, dtype=np.float32, *, repeats: int = REPEATS, min_time: float = MIN_TIME) -> float:
    """Bytes per second of ``x += a * y`` over ``n`` elements of ``dtype``.

    The best of ``repeats`` runs, as STREAM reports: the roofline is what the machine can do,
    and on a busy machine the median measures the neighbours instead.
    """
    x = np.ones(n, dtype)
    y = np.ones(n, dtype)
    a = np.dtype(dtype).type(1e-7)
    kernel = axpy_kernel(3 * n >= _config.PARALLEL_MIN_WORK)  # 3 streams: read x, y; write x
    seconds = time_per_call(lambda: kernel(x, y, a), warmup=2, repeats=repeats, min_time=min_time,
                            statistic=min)
    return 3 * x.itemsize * n / seconds


# -- timing -------------------------------------------------------------------------------
def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = WARMUP, repeats: int = REPEATS,
                     min_time: float = MIN_TIME, statistic: Callable = statistics.median) -> dict[str, float]:
    """Median (or ``statistic``) seconds per call of each function, timed in turns.

    Each function is called ``warmup`` times, then the number of calls that lasts ``min_time``
    is found by growing the count (as ``timeit`` does), so that microsecond steps are not lost
    in the clock's resolution. Then ``repeats`` rounds each time every function once, in
    turn: on a machine shared with other work, a busy moment slows all of them alike instead
    of whichever happened to be running.
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
    return {name: statistic(values) for name, values in samples.items()}


def time_per_call(fn: Callable[[], object], **kwargs) -> float:
    """Seconds per call of one function; see :func:`time_interleaved` for the keywords."""
    return time_interleaved({"fn": fn}, **kwargs)["fn"]


# -- one optimizer ------------------------------------------------------------------------
@dataclass
class Row:
    """The timings of one optimizer at one size (seconds per step; ``None`` when not run)."""

    rule: str
    size: int
    dtype: str
    state_buffers: int
    bytes_per_param: int
    bandwidth: float  # bytes/s of x += a*y at this size, timed in turns with this row
    fastopt: float
    numpy: float | None = None
    torch: float | None = None
    torch_impl: str | None = None

    @property
    def mparams_per_s(self) -> float:
        return self.size / self.fastopt / 1e6

    @property
    def gbps(self) -> float:
        return self.bytes_per_param * self.size / self.fastopt / 1e9

    @property
    def roofline(self) -> float:
        """Fraction of the measured bandwidth this step reaches."""
        return self.gbps * 1e9 / self.bandwidth

    @property
    def speedup_numpy(self) -> float | None:
        return None if self.numpy is None else self.numpy / self.fastopt

    @property
    def speedup_torch(self) -> float | None:
        return None if self.torch is None else self.torch / self.fastopt

    def to_dict(self) -> dict:
        derived = ("mparams_per_s", "gbps", "roofline", "speedup_numpy", "speedup_torch")
        return {**asdict(self), **{k: getattr(self, k) for k in derived}}


def _torch_optimizer(spec: Spec, param, grad):
    """``torch.optim``'s fastest CPU implementation of ``spec``: fused, else foreach."""
    import torch

    cls = getattr(torch.optim, spec.cls)
    tp = torch.from_numpy(param)
    tp.grad = torch.from_numpy(grad)
    accepted = inspect.signature(cls).parameters
    for flag in ("fused", "foreach"):
        if flag not in accepted:
            continue
        try:
            opt = cls([tp], **spec.options, **{flag: True})
            opt.step()  # some unsupported combinations only fail on the first step
        except (RuntimeError, TypeError, ValueError):
            continue
        return opt, flag
    return cls([tp], **spec.options), "for-loop"


def bench_rule(spec: Spec, n: int, dtype=np.float32, *, numpy: bool = True,
               torch: bool = True, warmup: int = WARMUP, repeats: int = REPEATS,
               min_time: float = MIN_TIME, seed: int = 0) -> Row:
    """Time ``spec`` on ``n`` parameters: the ``x += a * y`` probe, fastopt, the NumPy baseline
    and torch, in turns."""
    import fastopt as fo

    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n, dtype=np.float32).astype(dtype, copy=False)
    grad = rng.standard_normal(n, dtype=np.float32).astype(dtype, copy=False)

    opt = getattr(fo, spec.cls)([p0.copy()], **spec.options)
    nstate = sum(isinstance(v, np.ndarray) for v in opt.state[0].values())
    m = n * (2 + nstate) // 2  # the probe's two arrays span the optimizer's 2 + nstate
    x, y, a = np.ones(m, dtype), np.ones(m, dtype), np.dtype(dtype).type(1e-7)
    steps = {"probe": functools.partial(axpy_kernel(3 * m >= _config.PARALLEL_MIN_WORK), x, y, a),
             "fastopt": functools.partial(opt.step, [grad])}
    if numpy:
        steps["numpy"] = functools.partial(spec.baseline(p0.copy(), **spec.options).step, grad)
    torch_impl = None
    if torch and torch_available():
        topt, torch_impl = _torch_optimizer(spec, p0.copy(), grad)
        steps["torch"] = topt.step  # torch.optim steps run without autograd
    seconds = time_interleaved(steps, warmup=warmup, repeats=repeats, min_time=min_time)
    steps = opt = x = y = None  # free every buffer before the next case allocates its own
    gc.collect()
    bandwidth = 3 * np.dtype(dtype).itemsize * m / seconds["probe"]
    return Row(spec.name, n, np.dtype(dtype).name, nstate, (3 + 2 * nstate) * np.dtype(dtype).itemsize,
               bandwidth, seconds["fastopt"], seconds.get("numpy"), seconds.get("torch"), torch_impl)


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
    bandwidth: dict[int, float]  # size -> bytes/s of x += a*y, the median of the rows' probes
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "fastopt_version": _version(),
            "machine": self.machine,
            "dtype": self.dtype,
            "threads": self.threads,
            "bandwidth": [{"size": n, "bytes_per_s": b, "gbps": b / 1e9} for n, b in self.bandwidth.items()],
            "results": [r.to_dict() for r in self.rows],
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
            import subprocess

            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], check=False,
                                  capture_output=True, text=True, timeout=5).stdout.strip() or platform.machine()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import numba

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "numba_threads": numba.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version()}


class _PlainProgress:
    """What ``fastopt bench`` shows when tqdm is not installed: one line per case on stderr."""

    def __init__(self, total: int):
        self.total, self.done = total, 0

    def set_description(self, label: str) -> None:
        print(f"[{self.done + 1}/{self.total}] {label}", file=sys.stderr, flush=True)

    def update(self, k: int = 1) -> None:
        self.done += k

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool = True):
    """A tqdm bar on stderr if tqdm is installed, else plain lines; nothing when disabled."""
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total)
    return tqdm(total=total, unit="case", file=sys.stderr, leave=False, dynamic_ncols=True)


def run(rules: Sequence[str] = tuple(SPECS), sizes: Sequence[int] = DEFAULT_SIZES, dtype: str = "float32", *,
        threads: int | None = None, numpy: bool = True, torch: bool = True, repeats: int = REPEATS,
        warmup: int = WARMUP, min_time: float = MIN_TIME, progress: bool = False) -> Report:
    """Every rule at every size, each beside the bandwidth probe; see the module docstring.

    ``threads`` sets Numba's (and torch's) thread count for the run and restores it after.
    """
    import numba

    unknown = [r for r in rules if r not in SPECS]
    if unknown:
        raise ValueError(f"unknown rule(s) {', '.join(unknown)}; expected some of {', '.join(SPECS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not sizes or any(isinstance(n, bool) or int(n) != n or n < 1 for n in sizes):
        raise ValueError(f"sizes must be positive integers, got {list(sizes)}")
    sizes = [int(n) for n in sizes]
    np_dtype = DTYPES[dtype]
    use_torch = torch and torch_available()

    previous = numba.get_num_threads()
    previous_torch = None
    if threads is not None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise ValueError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} "
                             f"(NUMBA_NUM_THREADS), got {threads}")
        numba.set_num_threads(threads)
        if use_torch:
            import torch as _torch

            previous_torch = _torch.get_num_threads()
            _torch.set_num_threads(threads)
    start = time.perf_counter()
    bar = progress_bar(len(sizes) * len(rules), progress)
    try:
        report = Report(machine_info(), dtype, numba.get_num_threads(), {})
        for rule in rules:
            for n in sizes:
                if bar is not None:
                    bar.set_description(f"{rule}, n={n:.0e}")
                report.rows.append(bench_rule(SPECS[rule], n, np_dtype, numpy=numpy, torch=use_torch,
                                              warmup=warmup, repeats=repeats, min_time=min_time))
                if bar is not None:
                    bar.update(1)
        for n in sizes:
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


def format_table(report: Report) -> str:
    """The report as a plain-text table (what ``fastopt bench`` prints)."""
    m = report.machine
    lines = [
        (f"fastopt {_version()} bench: {m['cpu']}, {m['cores']} cores, {report.threads} Numba threads, "
         f"{report.dtype}"),
        "memory bandwidth (x += a*y in place, median beside the rows): "
        + ", ".join(f"{b / 1e9:.1f} GB/s at n={_size(n)}" for n, b in report.bandwidth.items()),
        "",
    ]
    header = ("optimizer", "params", "B/param", "ms/step", "Mparam/s", "GB/s", "roofline", "vs NumPy",
              "vs torch")
    table = []
    for r in report.rows:
        torch_col = "-" if r.speedup_torch is None else f"{r.speedup_torch:.2f}x {r.torch_impl}"
        table.append((r.rule, _size(r.size), str(r.bytes_per_param), f"{r.fastopt * 1e3:.3f}",
                      f"{r.mparams_per_s:,.0f}", f"{r.gbps:.1f}", f"{r.roofline:.0%}",
                      "-" if r.speedup_numpy is None else f"{r.speedup_numpy:.2f}x", torch_col))
    widths = [max(len(h), *(len(row[i]) for row in table)) if table else len(h) for i, h in enumerate(header)]
    left = {0, 8}

    def fmt(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(fmt(header))
    lines.append(fmt(["-" * w for w in widths]))
    lines.extend(fmt(row) for row in table)
    lines.append("")
    lines.append("ms/step: median fastopt step; GB/s: bytes a fused step must move (B/param) per second; "
                 "roofline: GB/s over x += a*y's on the same memory footprint, timed in turns with the row; "
                 "vs: the other's time over fastopt's. "
                 f"{report.seconds:.0f} s.")
    return "\n".join(lines)
