import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def sizes(default: str) -> list[int]:
    """Sizes from ``FASTOPT_BENCH_SIZES`` (comma-separated, e.g. ``1e3,1e5,1e7``)."""
    return [int(float(s)) for s in os.environ.get("FASTOPT_BENCH_SIZES", default).split(",")]
