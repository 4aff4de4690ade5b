"""RayTransport on a two-node Ray cluster (issue #21).

``ray.cluster_utils.Cluster``: a head that holds no CPU and two worker nodes of one CPU each.
Ray 2.60 puts a node on the host's own address even when told 127.0.0.1, so the scenarios
(``ray_cluster_scenarios.py``) run in a process of their own inside a network namespace that
has only loopback (``unshare --net``, as root), which the namespace's end removes; every
Ray process they start lives and dies in it. Where that cannot be done the test skips and
says why.

What is checked: ``RAY_ADDRESS`` alone attaches to the cluster; workers land on both nodes;
client data is loaded by the workers (a loader that records the process it ran in), never by
the driver; results equal the sequential transport's; the pool sizes itself to the cluster
and refuses what cannot be placed; a lost node's clients train on the surviving node within
the round; losing every node stops the run with a reason within a bounded time; `RAY_ADDRESS=...
fedmosaic run` attaches from the CLI, and `fedmosaic resume` after a lost node completes on
the node left.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

SCENARIOS = Path(__file__).with_name("ray_cluster_scenarios.py")


@pytest.fixture(scope="module")
def observed(tmp_path_factory) -> dict:
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("unshare") \
            or not shutil.which("ip"):
        pytest.skip("the cluster test needs a loopback-only network namespace: root, "
                    "util-linux unshare and iproute2 ip")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"unshare --net is not permitted here: {probe.stderr.decode()[:200]}")
    work = tmp_path_factory.mktemp("ray_cluster")
    out = work / "observed.json"
    cmd = f"ip link set lo up && exec {sys.executable} {SCENARIOS} {work} {out}"
    proc = subprocess.run(["unshare", "--net", "sh", "-c", cmd], capture_output=True,
                          text=True, timeout=420)
    if not out.exists():
        pytest.fail(f"the scenarios wrote nothing (exit {proc.returncode}):\n"
                    f"{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def test_ray_address_alone_attaches_and_workers_load_the_data_on_both_nodes(observed):
    seen = observed["attach"]
    assert "error" not in seen, seen.get("error")
    # Attached to the cluster named by RAY_ADDRESS (three nodes), not a private Ray, and
    # sized from its free CPUs: one worker per worker node.
    assert seen["alive_nodes"] == 3 and seen["address_used"]
    assert seen["num_workers"] == 2 and seen["worker_nodes"] == 2
    assert seen["updates"] == [8, 8] and seen["max_weight_diff"] < 1e-5
    loads = [(int(pid), cid) for pid, cid in seen["loads"]]
    assert loads, "no client was loaded"
    assert {pid for pid, _ in loads} <= set(seen["worker_pids"])
    assert seen["driver_pid"] not in {pid for pid, _ in loads}, "the driver loaded data"
    assert seen["driver_loaded"] == {}
    by_workers = {cid for w in seen["worker_loads"] for cid in w}
    assert by_workers == {cid for _, cid in loads}
    # Cached where they train: no client was loaded twice in two rounds.
    assert all(n == 1 for w in seen["worker_loads"] for n in w.values())


def test_what_cannot_be_placed_is_refused_with_the_clusters_free_resources(observed):
    refusal = observed["attach"].get("refusal", "")
    assert "no Ray worker can be placed: each needs CPU 4" in refusal
    assert "the cluster has CPU 0 free" in refusal  # both CPUs held by the running pool


def test_a_lost_node_never_hangs_the_run(observed):
    seen = observed["loss"]
    assert "error" not in seen, seen.get("error")
    # The lost node's clients trained on the other node within the round: no failures.
    assert seen["one_lost_updates"] == [8, 8, 8]
    assert seen["one_lost_failures"] == [0, 0, 0]
    assert seen["actors_after"] == 1 and seen["one_lost_seconds"] < 90
    # Losing the last node: a reason within a bounded time, never an unbounded wait.
    assert seen["all_lost"].startswith("WorkersLostError: every Ray worker was lost")
    assert seen["all_lost_seconds"] < 60


def test_fedmosaic_run_attaches_by_ray_address_and_resumes_on_the_node_left(observed):
    seen = observed["cli"]
    assert "error" not in seen, seen.get("error")
    # `RAY_ADDRESS=... fedmosaic run exp.toml` with no address in the file: workers on both
    # nodes, the data loaded by them only.
    assert "transport ray (2 workers on 2 nodes)" in seen["run_stdout"], seen["run_stdout"]
    assert seen["run_rc"] == 130 and seen["interrupted_after"] >= 3, seen["run_stderr"]
    assert seen["load_pids"] and seen["run_pid"] not in seen["load_pids"]
    assert seen["resume_pid"] not in seen["load_pids"]
    # One node lost: resume places what the cluster holds (after a bounded wait for the
    # second worker) and completes every round.
    assert seen["resume_rc"] == 0, seen["resume_stderr"]
    assert "1 of 2 workers could not be placed within 8 s; going on with 1" in \
        seen["resume_stderr"]
    assert seen["rounds"] == list(range(1, 61)) and seen["updates"] == [8]
    assert seen["transport"]["workers"] == 1 and seen["transport"]["nodes"] == 1
    assert seen["resume_seconds"] < 120
