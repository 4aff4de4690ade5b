"""``python -m fedmosaic.faults.launch ARGS``: the ``fedmosaic ARGS`` command, with the test
hooks that ``FEDMOSAIC_FAULT_*`` variables ask for installed first (``fedmosaic.faults.hooks``).
Used by the fault-injection scenarios only; without those variables it is ``fedmosaic``."""

from __future__ import annotations

import sys

from fedmosaic.faults.hooks import install_from_environment


def main() -> None:
    installed = install_from_environment()
    if installed:
        print(f"fault hooks installed: {', '.join(installed)}", file=sys.stderr, flush=True)
    from fedmosaic.cli import app

    app(prog_name="fedmosaic")


if __name__ == "__main__":
    main()
