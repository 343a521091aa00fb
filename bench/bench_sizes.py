"""The benchmark sizes, from ``FASTOPT_BENCH_SIZES`` (comma-separated, e.g. ``1e3,1e5,1e7``).

A module of its own, not ``conftest``: in a full run ``from conftest import ...`` can resolve
to another directory's conftest (tests/cuda/conftest.py) and fail collection."""

import os


def sizes(default: str) -> list[int]:
    return [int(float(s)) for s in os.environ.get("FASTOPT_BENCH_SIZES", default).split(",")]
