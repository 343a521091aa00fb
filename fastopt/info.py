"""``fastopt info``: what fastopt will run with on this machine.

Versions of fastopt and the libraries it uses, Numba's threading layer and thread count, where
the compiled kernels are cached and whether that directory is writable, and whether a CUDA GPU
is usable. Nothing here raises: a part that cannot be determined says why.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys
import tempfile


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Installed versions (``None``: not installed). torch is looked up, never imported."""
    from . import __version__

    out = {"fastopt": __version__, "python": platform.python_version()}
    for dist in ("numpy", "numba", "llvmlite", "tbb", "torch", "numba-cuda", "tqdm", "matplotlib", "scikit-learn"):
        out[dist] = _version(dist)
    return out


def threading_info() -> dict:
    """Numba's threading layer (found by running a tiny parallel kernel) and thread counts."""
    import numba
    import numpy as np

    from .bench import axpy_kernel
    from .kernels import _threads

    out = {"requested_layer": numba.config.THREADING_LAYER, "threads": numba.get_num_threads(),
           "max_threads": numba.config.NUMBA_NUM_THREADS, "cpus": os.cpu_count()}
    try:
        x = np.zeros(4)
        axpy_kernel(True)(x, x.copy(), 1.0)
        out["layer"] = numba.threading_layer()
        out["fork_safe"] = _threads.fork_safe()  # parallel kernels in a child forked now (else serial there)
    except Exception as exc:  # noqa: BLE001 - a report must not crash on a broken threading layer
        out["layer"] = None
        out["error"] = f"{type(exc).__name__}: {exc}"
    return out


def cache_info() -> dict:
    """Where fastopt caches its kernels and whether it can write there."""
    from .kernels import _cache, _config

    out = {"enabled": None, "directory": None, "writable": None,
           "disabled_by_env": os.environ.get("FASTOPT_NO_CACHE", "") not in ("", "0"),
           "NUMBA_CACHE_DIR": os.environ.get("NUMBA_CACHE_DIR") or None,
           "FASTOPT_CACHE_DIR": os.environ.get("FASTOPT_CACHE_DIR") or None}
    try:
        directory = _cache.cache_dir()
    except Exception as exc:  # noqa: BLE001 - a report must not crash
        out["error"] = f"{type(exc).__name__}: {exc}"
    else:
        out["directory"] = directory
        out["writable"] = _writable(directory)
    out["enabled"] = _config.cache_enabled()
    return out


def _writable(directory: str) -> bool:
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".fastopt-write-test"):
            pass
    except OSError:
        return False
    return True


def cuda_info() -> dict:
    """Whether numba.cuda sees a usable GPU, and its name; the reason when it does not."""
    out = {"available": False, "device": None, "reason": None}
    if importlib.util.find_spec("numba.cuda") is None:
        out["reason"] = "numba.cuda is not installed (pip install numba-cuda)"
        return out
    try:
        from numba import cuda as numba_cuda

        if not numba_cuda.is_available():
            out["reason"] = "no CUDA driver or GPU found"
            return out
        name = numba_cuda.get_current_device().name
        out["device"] = name.decode() if isinstance(name, bytes) else str(name)
        out["available"] = True
    except Exception as exc:  # noqa: BLE001 - any driver failure means "not usable", never a crash
        out["reason"] = f"{type(exc).__name__}: {exc}"
    return out


def collect() -> dict:
    """Everything ``fastopt info`` prints, as a dict."""
    from .bench import cpu_name

    return {"versions": versions(), "cpu": cpu_name(), "platform": platform.platform(),
            "executable": sys.executable, "threading": threading_info(), "cache": cache_info(), "cuda": cuda_info()}


def format_info(info: dict) -> str:
    """``collect()`` as aligned ``key: value`` lines."""
    v = info["versions"]
    t = info["threading"]
    c = info["cache"]
    g = info["cuda"]
    lines = ["fastopt " + v["fastopt"], ""]
    lines += [f"  {name:<13}{version or 'not installed'}" for name, version in v.items() if name != "fastopt"]
    layer = t["layer"] or f"unavailable ({t.get('error')})"
    cache_state = "on" if c["enabled"] else "off"
    if c["disabled_by_env"]:
        cache_state += " (FASTOPT_NO_CACHE is set)"
    gpu = g["device"] if g["available"] else f"not available: {g['reason']}"
    lines += [
        "",
        f"  cpu          {info['cpu']} ({t['cpus']} logical CPUs)",
        f"  platform     {info['platform']}",
        (f"  threading    {layer} layer, {t['threads']} threads (max {t['max_threads']}; "
         f"NUMBA_THREADING_LAYER={t['requested_layer']}"
         + ("" if t.get("fork_safe", True) else "; forked children run serially: pip install tbb") + ")"),
        (f"  cache        {cache_state}: {c['directory'] or c.get('error')} "
         f"({'writable' if c['writable'] else 'not writable'})"),
        f"  cuda         {gpu}",
    ]
    return "\n".join(lines)
