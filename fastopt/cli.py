"""The ``fastopt`` command: ``bench``, ``info`` and ``demo``.

A thin argparse layer: the work is in :mod:`fastopt.bench`, :mod:`fastopt.info` and the
examples (:mod:`fastopt.examples`). Bad arguments exit with status 2 and a message that says
what was expected, before anything is measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys


def parse_size(text: str) -> int:
    """A parameter count: ``1000``, ``1_000_000``, ``1e6``, ``2**20`` or ``2^20``."""
    s = text.strip().replace("_", "")
    power = re.fullmatch(r"(\d+)\s*(?:\*\*|\^)\s*(\d+)", s)
    try:
        if power:
            value = int(power.group(1)) ** int(power.group(2))
        elif re.fullmatch(r"\d+", s):
            value = int(s)
        else:
            f = float(s)
            if not f.is_integer():
                raise ValueError
            value = int(f)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: expected a whole number of parameters such as 1000, 1e6 or 2**20"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be at least 1")
    return value


def parse_sizes(text: str) -> list[int]:
    return [parse_size(part) for part in text.split(",") if part.strip()] or _empty("sizes")


def parse_rules(text: str) -> list[str]:
    from .bench import SPECS

    names = [part.strip().lower().replace("-", "_") for part in text.split(",") if part.strip()]
    if names == ["all"]:
        return list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown optimizer(s) {', '.join(unknown)}; choose from {', '.join(SPECS)} (or 'all')"
        )
    return names or _empty("rules")


def _empty(what: str):
    raise argparse.ArgumentTypeError(f"--{what} needs at least one value")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .bench import DEFAULT_SIZES, DRAM_RULES, DTYPES, REPEATS, SPECS, _size

    parser = argparse.ArgumentParser(
        prog="fastopt", description="Fused Numba optimizers: benchmark them, inspect the setup, run the demos."
    )
    sub = parser.add_subparsers(dest="command", metavar="{bench,info,demo}")
    sub.required = True

    bench = sub.add_parser(
        "bench", help="time every optimizer against this machine's memory bandwidth, NumPy and torch",
        description="Time each optimizer's step beside a loop with exactly its memory traffic (read 2+k, "
        "write 1+k arrays for k state buffers), and print Mparam/s, GB/s, the fraction of the probe's bandwidth "
        "reached (or 'noisy' when the rounds spread too much to tell), whether the arrays fit in the last-level "
        "cache, and the speed-up over a vectorized NumPy implementation and over torch.optim (fused, else "
        "foreach; n/a where torch lacks the optimizer) when torch is installed.",
    )
    bench.add_argument("--rules", type=parse_rules, default=list(SPECS), metavar="NAMES",
                       help=f"comma-separated optimizers (default: all): {','.join(SPECS)}")
    bench.add_argument("--sizes", type=parse_sizes, default=None, metavar="N,...",
                       help="parameter counts, e.g. 1e5,1e7 or 2**20 (default: "
                       f"{','.join(_size(n) for n in DEFAULT_SIZES)}, plus a DRAM-sized row for "
                       f"{','.join(DRAM_RULES)} where the last-level cache holds those and memory allows)")
    bench.add_argument("--dtype", choices=list(DTYPES), default="float32")
    bench.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="Numba (and torch) threads for the run (default: Numba's default)")
    bench.add_argument("--repeats", type=positive_int, default=REPEATS, metavar="N",
                       help="timed runs per measurement; the median is reported (default: %(default)s)")
    bench.add_argument("--no-numpy", dest="numpy", action="store_false", help="skip the NumPy baseline")
    bench.add_argument("--no-torch", dest="torch", action="store_false", help="skip torch even if installed")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--plot", metavar="FILE.png", help="also draw the results (needs matplotlib)")
    bench.add_argument("--quiet", action="store_true",
                       help="no progress bar (there is none either when stderr is not a terminal)")
    bench.set_defaults(func=cmd_bench, parser=bench)

    info = sub.add_parser("info", help="versions, threading layer, kernel cache and CUDA availability")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=cmd_info, parser=info)

    demo = sub.add_parser("demo", help="run the examples and write their pictures (needs matplotlib)")
    demo.add_argument("--out", default="fastopt-demo", metavar="DIR",
                      help="directory for the PNGs (default: %(default)s)")
    demo.add_argument("--full", action="store_true", help="the examples' full size instead of the quick one")
    demo.set_defaults(func=cmd_demo, parser=demo)
    return parser


def _have(module: str) -> bool:
    """Whether ``module`` is installed (without importing it)."""
    return importlib.util.find_spec(module) is not None


def _need_matplotlib(parser: argparse.ArgumentParser, what: str) -> None:
    if not _have("matplotlib"):
        parser.error(f"{what} needs matplotlib, which is not installed: pip install 'fastopt[plot]'")


def _check_output(parser: argparse.ArgumentParser, path: str, flag: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        parser.error(f"{flag} {path}: directory {directory} does not exist")


def show_progress(quiet: bool, stream=None) -> bool:
    """Whether ``fastopt bench`` draws its progress: not with ``--quiet``, and only on a terminal
    (a log file or a pipe gets the table alone)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return not quiet and bool(isatty and isatty())


def cmd_bench(args, parser) -> int:
    import numba

    from . import bench

    if args.threads is not None and args.threads > numba.config.NUMBA_NUM_THREADS:
        parser.error(f"--threads {args.threads}: at most {numba.config.NUMBA_NUM_THREADS} "
                     "(NUMBA_NUM_THREADS) on this machine")
    if args.plot:
        _need_matplotlib(parser, "--plot")
        _check_output(parser, args.plot, "--plot")
    if args.json:
        _check_output(parser, args.json, "--json")
    try:
        report = bench.run(args.rules, args.sizes, args.dtype, threads=args.threads, numpy=args.numpy,
                           torch=args.torch, repeats=args.repeats, progress=show_progress(args.quiet))
    except ValueError as exc:  # raised before anything is measured (e.g. a size too big for the memory)
        parser.error(str(exc))
    print(bench.format_table(report))
    if args.torch and not bench.torch_available():
        print("(torch is not installed: no torch column; pip install torch to compare)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        from ._bench_plot import plot_report

        plot_report(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cmd_info(args, parser) -> int:
    from . import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.format_info(data))
    return 0


def cmd_demo(args, parser) -> int:
    _need_matplotlib(parser, "fastopt demo")
    from .examples import mlp_digits, trajectories

    os.makedirs(args.out, exist_ok=True)
    small = not args.full
    written = trajectories.main(out_dir=args.out, small=small)
    if not _have("sklearn"):
        print("skipping the digits MLP: scikit-learn is not installed (pip install 'fastopt[examples]')")
    else:
        written += mlp_digits.main(out_dir=args.out, small=small)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastopt`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args, args.parser)


if __name__ == "__main__":
    sys.exit(main())
