"""A damaged kernel cache file is discarded with a warning and the kernel compiled again; it never
stops a process (found: one truncated or bit-flipped file raised ``UnpicklingError`` or
``UnicodeDecodeError`` in every later process until a person deleted the cache).

A first process fills a private cache; then each index (``.nbi``) and data (``.nbc``) file is
damaged in each way below, in a copy of that cache, and a new process must step to the right
numbers, warn at most (a ``KernelCacheWarning``), and leave a repaired cache that the next
process loads without a warning."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

STEP = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import fastopt as fo
        from fastopt.kernels import _build, adam
        w = np.linspace(-1, 1, 1000).astype(np.float32)
        opt = fo.Adam([w], lr=0.1, weight_decay=0.01)
        for g in (np.cos(np.arange(1000, dtype=np.float32)), np.ones(1000, np.float32)):
            opt.step([g])
    kernel = _build.cpu_kernel(adam.ADAM, False)
    print(json.dumps({"w": w.view(np.uint32).tolist(),
                      "hits": sum(kernel.stats.cache_hits.values()),
                      "misses": sum(kernel.stats.cache_misses.values()),
                      "warnings": [f"{type(c.message).__name__}: {c.message}" for c in caught]}))
    """
)


def _step(cache):
    env = {k: v for k, v in os.environ.items() if k not in ("FASTOPT_NO_CACHE", "FASTOPT_CACHE_DIR")}
    env["NUMBA_CACHE_DIR"] = str(cache)  # fastopt's kernels go to NUMBA_CACHE_DIR/fastopt/...
    proc = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"a damaged cache file stopped the process:\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _truncate(data):
    return data[: len(data) // 2]


def _flip_bit(data):  # one bit in the middle of the file
    out = bytearray(data)
    out[len(out) // 2] ^= 0x10
    return bytes(out)


def _empty(data):
    return b""


def _garbage(data):
    return np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes()


def _foreign_pickle(data):  # a valid pickle of the wrong thing (e.g. another tool's file)
    return pickle.dumps({"not": "a kernel"})


DAMAGE = {f.__name__.lstrip("_"): f for f in (_truncate, _flip_bit, _empty, _garbage, _foreign_pickle)}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    cache = tmp_path_factory.mktemp("pristine")
    first = _step(cache)
    assert first["misses"] == 1 and not first["warnings"], first
    files = sorted(p.relative_to(cache) for p in cache.rglob("_build.adam_serial_*") if p.suffix in (".nbi", ".nbc"))
    assert {p.suffix for p in files} == {".nbi", ".nbc"}, files
    return cache, files, first["w"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("suffix", [".nbi", ".nbc"])
def test_damaged_cache_file_is_discarded_and_recompiled(pristine, tmp_path, damage, suffix):
    source, files, reference = pristine
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    (target,) = [cache / f for f in files if f.suffix == suffix]
    target.write_bytes(DAMAGE[damage](target.read_bytes()))

    run = _step(cache)
    assert run["w"] == reference, "the step after a damaged cache gave other numbers"
    assert run["misses"] == 1, "the damaged entry was not recompiled"
    assert all(w.startswith("KernelCacheWarning") for w in run["warnings"]), run["warnings"]
    assert len(run["warnings"]) <= 1, run["warnings"]

    again = _step(cache)  # the recompiled kernel was cached again, whole
    assert again["w"] == reference
    assert (again["hits"], again["misses"]) == (1, 0), again
    assert again["warnings"] == []


@pytest.mark.parametrize("payload", [b"x", pickle.dumps(("not", "a", "compile", "result"))],
                         ids=["bad-pickle", "not-a-compile-result"])
def test_cache_entry_that_passes_its_checksum_but_cannot_be_loaded_is_recompiled(pristine, tmp_path, payload):
    """A data file whose frame is intact but whose contents do not load (another build's file, a
    bug) is a warning and a recompile too, not an exception."""
    from fastopt.kernels import _cache

    source, files, reference = pristine
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    (data,) = [cache / f for f in files if f.suffix == ".nbc"]
    data.write_bytes(_cache.MAGIC + hashlib.sha256(payload).digest() + payload)
    run = _step(cache)
    assert run["w"] == reference and run["misses"] == 1
    assert len(run["warnings"]) == 1 and run["warnings"][0].startswith("KernelCacheWarning"), run["warnings"]
    again = _step(cache)
    assert (again["hits"], again["warnings"]) == (1, [])


def test_cache_entry_that_cannot_be_read_or_written_is_a_warning_not_an_error(pristine, tmp_path):
    """An index and a data file replaced by directories (whoever runs the test, they can be
    neither read, deleted nor replaced): the step compiles, warns, and is right."""
    source, files, reference = pristine
    cache = tmp_path / "cache"
    shutil.copytree(source, cache)
    for f in files:
        (cache / f).unlink()
        (cache / f).mkdir()
        (cache / f / "keep").write_text("")
    run = _step(cache)
    assert run["w"] == reference and run["misses"] == 1
    assert run["warnings"] and all(w.startswith("KernelCacheWarning") for w in run["warnings"]), run["warnings"]
