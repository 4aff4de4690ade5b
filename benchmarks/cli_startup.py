"""How long the ``fedmosaic`` command takes to answer ``--help`` (issue #10, item 6).

A command line that needs seconds to print its help feels broken. ``fedmosaic --help`` must
answer in under 0.5 s, so the command line imports no heavy module (torch, gRPC,
cryptography, scikit-learn, scipy, matplotlib) until a command needs one. This script times
the real entry points in fresh processes (wall clock, median of ``--repeat`` runs after one
warm-up run that fills the page cache), lists the heavy modules the command line loaded (none
expected), and times ``import torch`` alone. With ``--before REV`` it also times ``--help`` of
the source tree at git revision REV (exported read-only with ``git archive`` to a temporary
directory), e.g. the last revision before the lazy imports.

Run: .venv/bin/python benchmarks/cli_startup.py [--repeat 10] [--before cd2478f]
Writes benchmarks/results/cli_startup.json; docs/benchmarks.md is regenerated from it by
benchmarks/report.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import machine, save

BUDGET_S = 0.5
HEAVY = ("torch", "grpc", "cryptography", "sklearn", "scipy", "matplotlib", "pandas", "opacus",
         "numpy")


def _script() -> str:
    """The installed ``fedmosaic`` console script next to this interpreter."""
    path = Path(sys.executable).with_name("fedmosaic")
    if not path.is_file():
        raise SystemExit(f"no fedmosaic script at {path}: install the package (make install)")
    return str(path)


def time_command(argv: list[str], repeat: int) -> dict[str, object]:
    """Wall time of ``argv`` in fresh processes: one warm-up, then ``repeat`` timed runs."""
    subprocess.run(argv, check=True, capture_output=True)
    seconds = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        seconds.append(time.perf_counter() - start)
    return {"argv": [Path(argv[0]).name, *argv[1:]], "seconds": seconds,
            "median_s": statistics.median(seconds), "min_s": min(seconds),
            "max_s": max(seconds)}


def help_at_revision(rev: str, repeat: int) -> dict[str, object]:
    """``fedmosaic --help`` of the source tree at git revision ``rev`` (same interpreter and
    installed dependencies; only fedmosaic's own code differs)."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(root), "archive", rev, "src"], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        code = (f"import sys; sys.path.insert(0, {str(Path(tmp) / 'src')!r}); "
                "sys.argv = ['fedmosaic', '--help']; from fedmosaic.cli import app; app()")
        result = time_command([sys.executable, "-c", code], repeat)
    result["argv"] = ["fedmosaic", "--help", f"(source at {rev})"]
    return result


def heavy_modules_loaded() -> list[str]:
    """Which heavy modules importing the whole command line (every group) loads."""
    code = f"import sys, fedmosaic.cli; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    return [m for m in out.split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--before", metavar="REV",
                        help="also time --help of the source at this git revision")
    args = parser.parse_args()
    script = _script()
    runs = {
        "fedmosaic --help": time_command([script, "--help"], args.repeat),
        "fedmosaic run --help": time_command([script, "run", "--help"], args.repeat),
        "fedmosaic --version": time_command([script, "--version"], args.repeat),
        "python -m fedmosaic --help": time_command([sys.executable, "-m", "fedmosaic", "--help"],
                                                   args.repeat),
        "python -c 'import torch'": time_command([sys.executable, "-c", "import torch"],
                                                 args.repeat),
        "python -c 'pass'": time_command([sys.executable, "-c", "pass"], args.repeat),
    }
    if args.before:
        runs[f"fedmosaic --help at {args.before}"] = help_at_revision(args.before, args.repeat)
    payload = {
        "command": f"python benchmarks/cli_startup.py --repeat {args.repeat}"
                   + (f" --before {args.before}" if args.before else ""),
        "machine": {**machine(), "date": datetime.now(timezone.utc).isoformat(),
                    # Start-up times depend on what else runs: say how busy the machine was.
                    "load_average_1min": os.getloadavg()[0]},
        "repeat": args.repeat,
        "budget_s": BUDGET_S,
        "heavy_modules_loaded": heavy_modules_loaded(),
        "runs": runs,
    }
    path = save("cli_startup", payload)
    for name, r in runs.items():
        print(f"{name:30s} median {r['median_s']:.3f} s  (min {r['min_s']:.3f}, "
              f"max {r['max_s']:.3f})")
    print(f"heavy modules loaded by the command line: {payload['heavy_modules_loaded'] or 'none'}")
    print(f"wrote {path}")
    if runs["fedmosaic --help"]["median_s"] >= BUDGET_S:  # type: ignore[operator]
        raise SystemExit(f"fedmosaic --help takes {runs['fedmosaic --help']['median_s']:.3f} s, "
                         f"over the {BUDGET_S} s budget")


if __name__ == "__main__":
    main()
