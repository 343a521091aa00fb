"""Where fastopt's kernel cache lives and what keys it.

Found: kernels were cached in ``site-packages/fastopt/**/__pycache__``, where the files outlive
``pip uninstall`` (the leftover folder then shadows an editable install) and a read-only install
cannot cache. They now go to a per-user directory (``FASTOPT_CACHE_DIR``, else
``NUMBA_CACHE_DIR/fastopt``, else the user cache directory), in a sub-directory keyed by fastopt's
sources and settings; the user's own Numba functions still cache where Numba puts them.
The install round trips (a venv, ``pip install``) are in ``test_install.py``."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import pytest

import fastopt
from fastopt.kernels import _config

CHECKOUT = Path(fastopt.__file__).resolve().parents[1]
PACKAGE_DIRS = [Path(fastopt.__file__).parent, Path(_config.__file__).parent]


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("FASTOPT_NO_CACHE", "FASTOPT_CACHE_DIR", "NUMBA_CACHE_DIR", "XDG_CACHE_HOME")}
    return {**env, **{k: str(v) for k, v in extra.items()}}


def _cache_files(root):
    return sorted(p for p in Path(root).rglob("*") if p.suffix in (".nbi", ".nbc"))


USER_CODE = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[1])
    import numpy as np, fastopt as fo
    import user_module                      # a user's own cache=True function
    w = np.zeros(1000, np.float32)
    fo.Adam([w]).step([np.ones_like(w)])
    fo.SGD([w], lr=0.1, momentum=0.9).step([np.ones_like(w)])
    assert user_module.double(2.0) == 4.0
    """
)


def _package_cache_files():
    return {p for d in PACKAGE_DIRS for p in _cache_files(d)}


def test_kernels_cache_in_the_per_user_directory_and_user_functions_where_numba_puts_them(tmp_path):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "user_module.py").write_text(
        "from numba import njit\n\n@njit(cache=True)\ndef double(x):\n    return 2.0 * x\n")
    before = _package_cache_files()
    env = _env(XDG_CACHE_HOME=tmp_path / "xdg", HOME=tmp_path / "home")
    subprocess.run([sys.executable, "-c", USER_CODE, str(tmp_path / "user")], env=env, check=True, timeout=600)

    fastopt_files = _cache_files(tmp_path / "xdg" / "fastopt")
    key_dirs = {p.parent for p in fastopt_files}
    assert len(key_dirs) == 1 and key_dirs.pop().parent == tmp_path / "xdg" / "fastopt", fastopt_files
    assert any(p.name.startswith("_build.adam_serial") for p in fastopt_files), fastopt_files
    assert not any("double" in p.name for p in fastopt_files), "a user function went into fastopt's cache"
    # the user's function: Numba's own choice, beside its source (its __pycache__)
    assert any(p.name.startswith("user_module.double") for p in _cache_files(tmp_path / "user" / "__pycache__"))
    assert _package_cache_files() == before, "fastopt wrote cache files into its own package"


def test_explicit_directories_take_precedence(tmp_path, monkeypatch):
    from fastopt.kernels import _cache

    monkeypatch.delenv("FASTOPT_CACHE_DIR", raising=False)
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if sys.platform.startswith("linux"):
        assert _cache.cache_root() == str(tmp_path / "xdg" / "fastopt")
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path / "numba"))
    assert _cache.cache_root() == str(tmp_path / "numba" / "fastopt")
    monkeypatch.setenv("FASTOPT_CACHE_DIR", str(tmp_path / "mine"))
    assert _cache.cache_root() == str(tmp_path / "mine")
    assert _cache.cache_dir() == os.path.join(str(tmp_path / "mine"), _cache.cache_key())


def test_cache_key_changes_with_version_settings_and_sources(monkeypatch, tmp_path):
    from fastopt.kernels import _cache

    key = _cache.cache_key()
    assert key.startswith(fastopt.__version__ + "-")

    def fresh_key():
        _cache.cache_key.cache_clear()
        return _cache.cache_key()

    try:
        assert fresh_key() == key  # deterministic
        monkeypatch.setattr(fastopt, "__version__", "99.0")
        assert fresh_key() != key
        monkeypatch.undo()
        monkeypatch.setattr(_config, "PREFETCH_BYTES", _config.PREFETCH_BYTES * 2)
        assert fresh_key() != key
        monkeypatch.undo()
        monkeypatch.setattr(numba.config, "OPT", 0)
        assert fresh_key() != key
        monkeypatch.undo()
        # an edited kernel source: the key hashes the files of fastopt.kernels
        kernels = tmp_path / "kernels"
        kernels.mkdir()
        for f in Path(_cache.__file__).parent.glob("*.py"):
            (kernels / f.name).write_bytes(f.read_bytes())
        monkeypatch.setattr(_cache, "__file__", str(kernels / "_cache.py"))
        assert fresh_key() == key
        (kernels / "adam.py").write_text((kernels / "adam.py").read_text() + "\n# edited\n")
        assert fresh_key() != key
    finally:
        monkeypatch.undo()
        assert fresh_key() == key


def test_second_process_loads_from_the_per_user_cache(tmp_path):
    code = textwrap.dedent("""
        import numpy as np, fastopt as fo
        from fastopt.kernels import _build, adam
        w = np.zeros(1000, np.float32)
        fo.Adam([w]).step([np.ones_like(w)])
        k = _build.cpu_kernel(adam.ADAM, False)
        print(sum(k.stats.cache_hits.values()), sum(k.stats.cache_misses.values()))
    """)
    env = _env(FASTOPT_CACHE_DIR=tmp_path / "c", NUMBA_CACHE_DIR=tmp_path / "numba")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                           timeout=600).stdout.split() for _ in range(2)]
    assert runs == [["0", "1"], ["1", "0"]]
    assert _cache_files(tmp_path / "c") and not _cache_files(tmp_path / "numba")  # FASTOPT_CACHE_DIR wins


def test_unwritable_cache_directory_falls_back_with_one_warning(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a directory cannot be made below a file, whoever runs the test
    code = textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import numpy as np, fastopt as fo
            w = np.zeros(10, np.float32)
            fo.SGD([w], lr=1.0).step([np.ones_like(w)])
            fo.Adam([w], lr=1.0).step([np.ones_like(w)])
        print(w[0], sum("cannot write its kernel cache" in str(c.message) for c in caught), len(caught))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=_env(FASTOPT_CACHE_DIR=blocker / "cache"),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["-2.0", "1", "1"]


@pytest.mark.skipif(not (CHECKOUT / "pyproject.toml").is_file(), reason="needs the source checkout")
def test_no_kernel_is_compiled_with_numbas_own_cache():
    """Numba's ``cache=True`` would put files beside the source: every CPU kernel goes through
    ``kernels._cache.jit`` instead (``numba.cuda``'s dispatcher has its own cache class)."""
    offenders = []
    for path in sorted((CHECKOUT / "fastopt").rglob("*.py")) + sorted((CHECKOUT / "kernels").rglob("*.py")):
        if path.name in ("cuda.py", "_cuda_backend.py", "_flat_cuda.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and any(k.arg == "cache" for k in node.keywords):
                name = ast.unparse(node.func)
                if name.endswith("jit") and name != "_cache.jit":
                    offenders.append(f"{path.relative_to(CHECKOUT)}:{node.lineno}: {name}(cache=...)")
    assert offenders == []
