"""The full fault-injection suite (issue #18, item 5): every scenario of
``fedmosaic.faults.scenarios``, each a small real federation (``fedmosaic server`` and three
``fedmosaic client`` processes over mutual TLS on 127.0.0.1, digits, a tiny MLP, 2-3 rounds)
into which one fault is injected: SIGKILL and restart of a client or of the server at named
points, hostile members, bad certificates, network faults through the local TCP proxy. Each
returns a row (outcome, seconds, what was checked, key counts); the CI runs a short selection
(tests/faults/test_chaos_ci.py).

Run: .venv/bin/python benchmarks/chaos.py [--only NAME ...] [--keep DIR]
Writes benchmarks/results/chaos.json (not with --only); docs/benchmarks.md is regenerated from
it by benchmarks/report.py. Exits 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path
from typing import Any

HEADING = "## Fault-injection suite (issue #18)"


def main() -> int:
    from common import machine, save

    from fedmosaic.faults.scenarios import CI_SELECTION, SCENARIOS, run_scenario

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=sorted(SCENARIOS), default=None,
                        help="run these scenarios only (results are printed, not saved)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep every scenario's directory (logs, outputs) under DIR")
    args = parser.parse_args()
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    names = args.only or list(SCENARIOS)
    info = machine() | {"date": dt.datetime.now(dt.timezone.utc).isoformat(),
                        "load_average_1min": os.getloadavg()[0]}
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(names, 1):
        result = run_scenario(name, keep=args.keep)
        spec = SCENARIOS[name]
        # A failure at the check a known bug breaks is that bug, shown as such; any other
        # failure of the scenario is not.
        known = bool(spec.known_bug) and result.outcome == "failed" \
            and result.error.startswith(spec.bug_check)
        rows.append(result.row() | {"summary": spec.summary, "budget_s": spec.budget,
                                    "in_ci": name in CI_SELECTION,
                                    "known_bug": spec.known_bug if known else ""})
        print(f"[{i}/{len(names)}] {name}: {result.outcome} in {result.seconds:.1f}s "
              f"({len(result.checked)} checks)", flush=True)
        if result.error:
            print("    " + result.error.replace("\n", "\n    "), flush=True)
    total = time.monotonic() - started
    failed = [r["name"] for r in rows if r["outcome"] != "ok" and not r["known_bug"]]
    known = [r["name"] for r in rows if r["known_bug"]]
    print(f"{len(rows) - len(failed) - len(known)} of {len(rows)} scenarios ok in {total:.0f}s"
          + (f"; failed on a known bug: {', '.join(known)}" if known else "")
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    info["load_average_1min_end"] = os.getloadavg()[0]
    if args.only is None:
        path = save("chaos", {"command": "python benchmarks/chaos.py", "machine": info,
                              "total_s": round(total, 1), "scenarios": rows})
        print(f"wrote {path}")
    return 1 if failed else 0  # a known bug, reproduced as expected, is not a failure here


def _counts(counts: dict[str, Any]) -> str:
    """The key counts of a row, short: nested dicts flattened, lists of records omitted."""
    parts = []
    for key, value in counts.items():
        if key == "retry_reasons":
            continue  # in the JSON file
        if key == "round_records":
            value = "/".join(str(r["updates"]) for r in value)
            key = "updates per round"
        elif isinstance(value, dict):  # zero counts of the proxy left out
            value = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in value.items() if v != 0)
            value = f"({value})"
        elif isinstance(value, float):
            value = f"{value:.2g}"
        parts.append(f"{key} {value}")
    return "; ".join(parts).replace("|", "/")


def markdown(d: dict[str, Any]) -> str:
    """The section of docs/benchmarks.md (called by benchmarks/report.py)."""
    from report import machine_line  # benchmarks/report.py

    rows = d["scenarios"]
    ok = sum(r["outcome"] == "ok" for r in rows)
    known = [r for r in rows if r.get("known_bug")]
    m = d["machine"]
    lines = [
        HEADING,
        "",
        "Each scenario is a small real federation: `fedmosaic server` and three `fedmosaic "
        "client` processes (four members in the hostile-member scenarios) over mutual TLS on "
        "127.0.0.1, digits, an MLP with 8 hidden units, 2-3 rounds, with one fault injected; "
        "it checks the promises of docs/deployment.md (\"Faults and limits\"). *Checks*: how "
        "many separate promises were checked (each scenario's list is in the JSON file). "
        "*Seconds*: wall time of the whole scenario, the start-up of every process included. "
        "*CI*: part of `tests/faults/test_chaos_ci.py`. *max_abs_diff_vs_simulation*: the "
        "largest difference between the final `model.pt` and the simulation of the same run "
        "(checked <= 1e-5). *retries*: round retries recorded in `metrics.json`.",
        "",
        f"Command: `.venv/bin/python {d['command'].removeprefix('python ')}`",
        "",
        machine_line(m) + (f" Load average when it started: {m['load_average_1min']:.1f}"
                           + (f", when it ended: {m['load_average_1min_end']:.1f}"
                              if m.get("load_average_1min_end") is not None else "")
                           + " (other jobs on the 2 cores)." if m.get("load_average_1min")
                           is not None else ""),
        "",
        f"{ok} of {len(rows)} scenarios ok"
        + (f", {len(known)} failed on a known bug (below)" if known else "")
        + f", {d['total_s']:.0f} s in all.",
        "",
        "| scenario | outcome | seconds | checks | CI | key counts |",
        "|---|---|--:|--:|---|---|",
    ]
    from fedmosaic.faults.scenarios import CI_SELECTION  # the selection now, not at the run

    for r in rows:
        outcome = "failed: known bug" if r.get("known_bug") else r["outcome"]
        lines.append(f"| `{r['name']}` | {outcome} | {r['seconds']:.1f} | "
                     f"{len(r['checked'])} | {'yes' if r['name'] in CI_SELECTION else ''} | "
                     f"{_counts(r['counts'])} |")
    lines += ["", "What each scenario injects and checks:", ""]
    lines += [f"- `{r['name']}`: {r['summary']}." for r in rows]
    if known:
        lines += ["", "Known bugs the suite shows (the scenario fails at the check named, and "
                  "its CI test is an expected failure until the bug is fixed):", ""]
        lines += [f"- `{r['name']}`: {r['known_bug']}. Failed check: "
                  f"{r['error'].splitlines()[0]}" for r in known]
    failed = [r for r in rows if r["outcome"] != "ok" and not r.get("known_bug")]
    if failed:
        lines += ["", "Failures:", ""]
        lines += [f"- `{r['name']}`: {r['error'].splitlines()[0]}" for r in failed]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
