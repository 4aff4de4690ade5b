"""Named fault-injection scenarios (issue #18, item 5). Each sets up a small federation (digits,
a tiny MLP, 2-3 rounds, 3 honest clients, mutual TLS on 127.0.0.1) in a temporary directory,
injects one fault, and checks the outcome against docs/deployment.md ("Faults and limits"):

- every round is aggregated exactly once (``metrics.json`` holds rounds 1..R once each);
- the checkpoint is never corrupt (it loads, with the round the run had committed);
- where every honest client's update of every round is accepted, the final model equals the
  simulation of the same experiment (the oracle of tests/net/test_e2e.py); a round that loses
  an update is retried (``min_updates`` = every client), so a kill must not change the model;
- a hostile member does not change what the honest clients do (each round aggregates all of
  their updates; they exit 0 having trained every round);
- the refusal counters in ``/metrics`` equal what the scenario provoked.

Every wait is bounded in time, every loop in count. ``run_scenario(name)`` returns a
``Result`` row; ``SCENARIOS`` lists them; ``benchmarks/chaos.py`` runs them all and
``tests/faults/test_chaos_ci.py`` a short selection.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from fedmosaic.faults import hooks
from fedmosaic.faults.federation import Federation, ScenarioFailed
from fedmosaic.faults.proxy import Fault, FaultProxy

C = grpc.StatusCode
REJECTED = 'fedmosaic_rejected_messages_total{reason="%s"}'
DROPPED = 'fedmosaic_clients_dropped_total{reason="%s"}'
HANDSHAKE = 'fedmosaic_tls_handshake_failures_total{kind="%s"}'
CHUNK = 4096  # chunk_bytes of the hostile-member scenarios; the message limit is CHUNK + 64 KiB
LIMIT = CHUNK + 64 * 1024


@dataclass
class Result:
    """One scenario's row: ``outcome`` is ``ok`` or ``failed`` (``error`` says which promise,
    and the end of the server's log)."""

    name: str
    outcome: str
    seconds: float
    checked: list[str]
    counts: dict[str, Any]
    error: str = ""

    def row(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Run:
    """What a scenario body gets: a directory, a time budget, and ``check``."""

    name: str
    root: Path
    budget: float
    started: float = field(default_factory=time.monotonic)
    checked: list[str] = field(default_factory=list)
    counts: dict[str, Any] = field(default_factory=dict)

    def check(self, ok: Any, what: str, detail: Any = "") -> None:
        if not ok:
            raise ScenarioFailed(f"{what}: {detail}" if detail != "" else what)
        self.checked.append(what)

    def left(self, at_most: float | None = None) -> float:
        """Seconds left of the budget (at least 1; capped at ``at_most``)."""
        left = max(1.0, self.budget - (time.monotonic() - self.started))
        return min(left, at_most) if at_most is not None else left


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    body: Callable[[Run], None]
    budget: float  # seconds
    known_bug: str = ""  # a promise this scenario shows broken today (it fails until fixed)
    bug_check: str = ""  # the check that fails because of it


SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str, summary: str, budget: float = 90.0, known_bug: str = "",
             bug_check: str = "") -> Callable[[Callable[[Run], None]], Callable[[Run], None]]:
    def register(body: Callable[[Run], None]) -> Callable[[Run], None]:
        SCENARIOS[name] = Scenario(name, summary, body, budget, known_bug, bug_check)
        return body
    return register


def run_scenario(name: str, *, keep: Path | None = None) -> Result:
    """Run scenario ``name`` in a temporary directory (kept under ``keep`` if given)."""
    spec = SCENARIOS[name]
    root = Path(tempfile.mkdtemp(prefix=f"chaos-{name}-", dir=keep))
    run = Run(name, root, spec.budget)
    error = ""
    try:
        spec.body(run)
    except ScenarioFailed as exc:
        error = str(exc)
    except Exception:  # a scenario's own bug is a failure too, with its traceback
        error = traceback.format_exc(limit=6)
    seconds = round(time.monotonic() - run.started, 2)
    if not error and seconds > spec.budget:
        error = f"took {seconds}s, over its budget of {spec.budget}s"
    if keep is None and not error:
        shutil.rmtree(root, ignore_errors=True)
    elif error:
        error += f"\n(logs kept in {root / 'logs'})"
    return Result(name, "failed" if error else "ok", seconds, run.checked, run.counts, error)


# --- shared checks ----------------------------------------------------------------------------


def _simulated_model(fed: Federation) -> dict[str, Any]:
    """The oracle: the same experiment simulated in this process (every client, every round)."""
    import torch

    from fedmosaic.build import build_data, build_strategy, build_trainer
    from fedmosaic.config import load_experiment
    from fedmosaic.runtime.simulate import simulate

    exp = load_experiment(fed.experiment)
    data = build_data(exp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reduction order, as the equality tests use
    try:
        result = simulate(build_trainer(exp, data), data, build_strategy(exp),
                          exp[""]["rounds"], seed=exp[""]["seed"], identity=exp.identity())
    finally:
        torch.set_num_threads(threads)
    return dict(result.state_dict())


def check_rounds_once(run: Run, fed: Federation, rounds: int, updates: int) -> list[dict]:
    history = fed.history()
    run.check([r["round"] for r in history] == list(range(1, rounds + 1)),
              f"metrics.json holds rounds 1..{rounds} once each",
              [r["round"] for r in history])
    run.check(all(r["updates"] == updates for r in history),
              f"each round aggregated {updates} updates", [r["updates"] for r in history])
    run.counts["rounds"] = len(history)
    run.counts["retries"] = sum(len(r.get("retries", [])) for r in history)
    if run.counts["retries"]:
        run.counts["retry_reasons"] = [f"round {r['round']}: {why[:120]}" for r in history
                                       for why in r.get("retries", [])]
    return history


def check_checkpoint(run: Run, fed: Federation, round_num: int, what: str = "") -> None:
    import torch

    path = fed.out / "checkpoint.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt checkpoint is the failure being looked for
        raise ScenarioFailed(f"checkpoint unreadable{what}: {exc}") from exc
    run.check(int(state["round"]) == round_num,
              f"checkpoint intact{what} (round {round_num})", int(state["round"]))


def check_model_is_simulation(run: Run, fed: Federation) -> None:
    import torch

    model = torch.load(fed.out / "model.pt", map_location="cpu", weights_only=True)
    reference = _simulated_model(fed)
    worst = max(float((model[k] - v).abs().max()) for k, v in reference.items())
    run.counts["max_abs_diff_vs_simulation"] = worst
    run.check(set(model) == set(reference) and worst <= 1e-5,
              "final model equals the simulation of the same run (atol 1e-5)", worst)


def check_clients_done(run: Run, fed: Federation, ids: list[str], rounds: int,
                       timeout: float = 60.0, since: dict[str, int] | None = None) -> None:
    since = since or {}
    end = time.monotonic() + timeout
    for cid in ids:
        rc = fed.wait(cid, end - time.monotonic())
        run.check(rc == 0, f"{cid} exits 0", f"{rc}: {fed.log(cid)[-800:]}")
    # A client lists a round twice when it uploaded to a failed attempt and then to the
    # retry (documented); a restarted client lists the rounds since its restart.
    trained = {cid: _trained_rounds(fed.log(cid)) for cid in ids}
    want = {cid: set(range(since.get(cid, 1), rounds + 1)) for cid in ids}
    run.check(all(want[c] <= set(trained[c]) for c in ids),
              "every honest client trained every round (since its restart)", trained)


def _trained_rounds(log: str) -> list[int]:
    """The rounds of the last ``trained rounds [...]`` line of a client's log."""
    found = re.findall(r"trained rounds \[([0-9, ]*)\]", log)
    return [int(x) for x in found[-1].split(",") if x.strip()] if found else []


def check_server_done(run: Run, fed: Federation, timeout: float) -> None:
    rc = fed.wait("server", timeout)
    run.check(rc == 0, "server exits 0", f"{rc}: {fed.log('server')[-1500:]}")
    errors = [line for line in fed.log("server").splitlines()
              if '"level": "ERROR"' in line or '"level": "CRITICAL"' in line]
    run.check(not errors, "no ERROR in the server's log", errors[:3])


def settled(fed: Federation, expected: dict[str, float], timeout: float) -> dict[str, float]:
    """The counters named in ``expected`` once they equal it (or after ``timeout``): a handler
    counts its refusal just after answering."""
    end = time.monotonic() + timeout
    while True:
        scraped = fed.metrics()
        got = {k: scraped.get(k, -1.0) for k in expected}
        if got == expected or time.monotonic() > end:
            return got
        time.sleep(0.1)


def _label(sample: str) -> str:
    """``rejected.stalled`` for ``fedmosaic_rejected_messages_total{reason="stalled"}``."""
    kind = "rejected" if sample.startswith("fedmosaic_rejected") else "dropped"
    return f"{kind}.{sample.split(chr(34))[1]}"


def _federation(run: Run, **kwargs: Any) -> Federation:
    return Federation.create(run.root, **kwargs)


# --- kills ---------------------------------------------------------------------------------------

_KILL_SERVER = {"round_retries": 3, "linger": 3.0}
_EVERY_UPDATE = {"min_updates": 3}  # a round that loses an update is retried, not thinned


@scenario("client_sigkill_restart",
          "SIGKILL a client while round 2 trains, restart it: round 2 is retried with every "
          "client, each round once, the model equals the simulation")
def client_sigkill_restart(run: Run) -> None:
    with _federation(run, rounds=3, server=_KILL_SERVER, strategy=_EVERY_UPDATE) as fed:
        victim = fed.ids[1]
        fed.server()
        for cid in fed.ids:
            # The victim trains slowly, so the kill certainly lands inside its round-2 fit.
            fed.client(cid, fit_delay=2.0 if cid == victim else 0.3)
        fed.wait_endpoint()
        fed.wait_until(lambda: fed.round_open(2), run.left(60), "round 2")
        fed.kill(victim)
        fed.client(victim, fit_delay=0.3)
        check_server_done(run, fed, run.left(90))
        history = check_rounds_once(run, fed, 3, updates=3)
        run.check(len(history[1].get("retries", [])) >= 1, "round 2 was retried",
                  history[1].get("retries"))
        check_clients_done(run, fed, fed.ids, 3, since={victim: 2})
        run.check("joined 1 times" in fed.log(victim).splitlines()[-1],
                  "the restarted client joined again by itself", fed.log(victim)[-300:])
        check_checkpoint(run, fed, 3)
        check_model_is_simulation(run, fed)


@scenario("client_slow_first_fit",
          "a client whose first local fit takes 2.5 s, on a server with heartbeat_interval "
          "0.5 s (liveness 1.5 s): alive and heartbeating, it must not be dropped",
          # Found by this scenario and fixed: the heartbeat thread first waited the
          # pre-join default of 5 s instead of the server's interval (net/client.py).
          )
def client_slow_first_fit(run: Run) -> None:
    with _federation(run, rounds=1, server={"linger": 3.0}, strategy=_EVERY_UPDATE) as fed:
        slow = fed.ids[2]
        fed.server()
        for cid in fed.ids[:2]:
            fed.client(cid)
        fed.wait_endpoint()
        baseline = fed.metrics()[DROPPED % "heartbeat_timeout"]
        # Started last, once the other two heartbeat steadily (their first beat too comes 5 s
        # after their start), so that round 1 begins the moment it joins and its fit follows
        # its Join at once.
        fed.wait_until(lambda: (st := fed.status()) is not None and st.connected_clients >= 2,
                       run.left(60), "two clients joined")
        time.sleep(6.0)
        fed.wait_until(lambda: (st := fed.status()) is not None and st.connected_clients >= 2,
                       run.left(60), "two clients heartbeating")
        fed.client(slow, fit_delay=2.5)
        seen = [0.0]

        def round_over() -> bool:  # the drop counter, read while the server runs
            # A server shutting down may answer /metrics without the series: keep the last.
            with contextlib.suppress(OSError, KeyError):
                seen[0] = fed.metrics()[DROPPED % "heartbeat_timeout"] - baseline
            return bool(fed.history()) or fed.procs["server"].poll() is not None

        fed.wait_until(round_over, run.left(60), "round 1 to end")
        dropped = seen[0]
        run.counts["dropped_heartbeat_timeout"] = dropped
        check_server_done(run, fed, run.left(60))
        check_rounds_once(run, fed, 1, updates=3)
        check_clients_done(run, fed, fed.ids, 1)
        run.check(dropped == 0, "no live client dropped as heartbeat_timeout", dropped)
        run.check(not fed.history()[0].get("retries"), "round 1 needed no retry",
                  fed.history()[0].get("retries"))


def _server_kill_and_restart(run: Run, fed: Federation, *, env: dict[str, str] | None,
                             when: Callable[[], Any], what: str, resumed_after: int,
                             rounds: int) -> None:
    fed.server(env=env)
    for cid in fed.ids:
        fed.client(cid, fit_delay=0.5)
    fed.wait_endpoint()
    fed.wait_until(when, run.left(60), what)
    fed.kill("server")
    if resumed_after:
        check_checkpoint(run, fed, resumed_after, " after the kill")
    fed.server()
    fed.wait_endpoint()
    check_server_done(run, fed, run.left(90))
    check_rounds_once(run, fed, rounds, updates=3)
    if resumed_after:
        run.check(f"resuming chaos-digits after round {resumed_after}" in fed.log("server"),
                  f"the restarted server resumed after round {resumed_after}")
    check_clients_done(run, fed, fed.ids, rounds)
    check_checkpoint(run, fed, rounds)
    check_model_is_simulation(run, fed)


@scenario("server_sigkill_training",
          "SIGKILL the server while round 2 trains, restart it on the same port: it resumes "
          "after round 1, clients rejoin, each round once, the model equals the simulation")
def server_sigkill_training(run: Run) -> None:
    with _federation(run, rounds=3, server=_KILL_SERVER, strategy=_EVERY_UPDATE) as fed:
        _server_kill_and_restart(run, fed, env=None, when=lambda: fed.round_open(2),
                                 what="round 2", resumed_after=1, rounds=3)
        run.check(all("joined 2 times" in fed.log(c) for c in fed.ids),
                  "every client joined the restarted server by itself")


@scenario("server_sigkill_checkpoint_write",
          "SIGKILL the server inside round 2's checkpoint write (slow-fsync hook, after the "
          "temporary file is synced, before the rename): the old checkpoint is intact, the "
          "restart removes the temporary file, reruns round 2, the model equals the "
          "simulation")
def server_sigkill_checkpoint_write(run: Run) -> None:
    with _federation(run, rounds=3, server=_KILL_SERVER, strategy=_EVERY_UPDATE) as fed:
        env = {hooks.SLOW_FSYNC: "2:60"}

        def in_write() -> bool:
            return fed.marker("fsync-2")

        fed.server(env=env)
        for cid in fed.ids:
            fed.client(cid, fit_delay=0.5)
        fed.wait_endpoint()
        fed.wait_until(in_write, run.left(60), "round 2's checkpoint write")
        fed.kill("server")
        left = sorted(p.name for p in fed.out.glob(".checkpoint.pt.*.tmp"))
        run.check(len(left) == 1, "the kill left the write's temporary file", left)
        check_checkpoint(run, fed, 1, " after the kill")
        fed.server()
        fed.wait_endpoint()
        check_server_done(run, fed, run.left(90))
        run.check("removed 1 temporary file left in" in fed.log("server"),
                  "the restart removed the temporary file (and logged it)")
        run.check(not list(fed.out.glob(".checkpoint.pt.*.tmp")), "no temporary file remains")
        run.check("resuming chaos-digits after round 1" in fed.log("server"),
                  "the restarted server resumed after round 1")
        check_rounds_once(run, fed, 3, updates=3)
        check_clients_done(run, fed, fed.ids, 3)
        check_checkpoint(run, fed, 3)
        check_model_is_simulation(run, fed)


@scenario("server_sigkill_startup",
          "SIGKILL the server twice at start-up (while importing, then just after it "
          "listens), restart: the run completes once, the model equals the simulation")
def server_sigkill_startup(run: Run) -> None:
    with _federation(run, rounds=2, server=_KILL_SERVER, strategy=_EVERY_UPDATE) as fed:
        fed.server()
        time.sleep(1.0)  # mid-import: nothing written yet
        fed.kill("server")
        run.check(not (fed.out / "checkpoint.pt").exists(), "no checkpoint before a round")
        fed.server()
        fed.wait_endpoint()
        for cid in fed.ids:
            fed.client(cid)
        fed.kill("server")  # listening, no client joined yet (their imports take seconds)
        fed.server()
        fed.wait_endpoint()
        check_server_done(run, fed, run.left(90))
        check_rounds_once(run, fed, 2, updates=3)
        check_clients_done(run, fed, fed.ids, 2)
        check_checkpoint(run, fed, 2)
        check_model_is_simulation(run, fed)
        run.counts["server_starts"] = fed.server_starts


@scenario("server_sigkill_after_final_round",
          "SIGKILL the server after the final checkpoint, before any client heard DONE (hold "
          "hook); restarted, it lingers and serves DONE: every client exits 0")
def server_sigkill_after_final_round(run: Run) -> None:
    with _federation(run, rounds=2, server={**_KILL_SERVER, "linger": 12.0}) as fed:
        fed.server(env={hooks.HOLD_AFTER_CHECKPOINT: "2:60"})
        for cid in fed.ids:
            fed.client(cid)
        fed.wait_endpoint()
        fed.wait_until(lambda: fed.marker("checkpoint-2"), run.left(60), "the final checkpoint")
        fed.kill("server")
        check_checkpoint(run, fed, 2, " after the kill")
        run.check(all(fed.procs[c].poll() is None for c in fed.ids),
                  "no client had heard DONE when the server died")
        started = time.monotonic()
        fed.server()
        fed.wait_endpoint()
        check_clients_done(run, fed, fed.ids, 2, timeout=run.left(40))
        check_server_done(run, fed, run.left(30))
        took = time.monotonic() - started
        run.check("had already finished all 2 rounds: serving DONE" in fed.log("server"),
                  "the restarted server found the run finished and served DONE")
        run.check(took >= 12.0, "it lingered the whole linger (12 s)", took)
        check_rounds_once(run, fed, 2, updates=3)
        check_model_is_simulation(run, fed)
        run.counts["restart_to_exit_s"] = round(took, 1)


# --- hostile members ---------------------------------------------------------------------------

_HOSTILE_SERVER = {"min_clients": 4, "chunk_bytes": CHUNK, "stream_idle_timeout": 1.5,
                   "round_deadline": 30.0, "linger": 3.0}


def _spec_and_numel(fed: Federation) -> tuple[str, int]:
    from fedmosaic.build import build_data, build_trainer
    from fedmosaic.config import load_experiment
    from fedmosaic.net.wire import spec_hash

    exp = load_experiment(fed.experiment)
    trainer = build_trainer(exp, build_data(exp))
    return spec_hash(trainer.spec), trainer.spec.numel


def _hostile_run(run: Run, attack: Callable[[Any, Any, int], dict[str, float]], *,
                 before_round: Callable[[Any, Federation], dict[str, float]] | None = None,
                 honest_updates: int = 3, rounds: int = 2) -> None:
    """Three honest client processes and one hostile member (the partition's 4th id, raw
    calls) that joins first. ``before_round(member, fed)`` acts before round 1 starts;
    ``attack(member, task, numel)`` against its round-1 task. Each returns the refusal
    counters it must have moved (by exactly that much). Then the member sits the other
    rounds out (refuses its tasks), and the honest run must be whole."""
    from fedmosaic.faults.hostile import Member

    with _federation(run, clients=4, rounds=rounds, server=_HOSTILE_SERVER) as fed:
        hostile, honest = fed.ids[3], fed.ids[:3]
        spec, numel = _spec_and_numel(fed)
        fed.server()
        fed.wait_endpoint()
        baseline = fed.metrics()
        member = Member(fed.endpoint["port"], fed.credentials, hostile, spec)
        try:
            member.join()
            expected: dict[str, float] = {}
            if before_round is not None:
                expected |= before_round(member, fed)
            member.beat()
            for cid in honest:
                fed.client(cid)
            task = member.next_fit(run.left(60))
            run.check(task is not None and task.round == 1, "the hostile member got a round-1 "
                      "task", task)
            for key, n in attack(member, task, numel).items():
                expected[key] = expected.get(key, 0.0) + n
            # Its round is held open by no one: the honest uploads close it. Counters first,
            # while the server runs (its round 2 waits for the hostile's answer).
            want = {k: baseline.get(k, 0.0) + v for k, v in expected.items()}
            got = settled(fed, want, 10.0)
            run.check(got == want, "the refusal counters in /metrics equal what was provoked",
                      {k: (got[k] - baseline.get(k, 0.0), expected[k]) for k in expected})
            run.counts["provoked"] = {_label(k): v for k, v in expected.items()}
            status = fed.status_cli()
            run.check(status.get("state") in ("training", "waiting", "evaluating"),
                      "fedmosaic status answers while the hostile member acts", status)
            run.counts["sat_out"] = member.sit_out(run.left(60))
        finally:
            member.close()
        check_server_done(run, fed, run.left(60))
        history = fed.history()
        run.check([r["round"] for r in history] == list(range(1, rounds + 1)),
                  "metrics.json holds every round once", [r["round"] for r in history])
        run.check(history[0]["updates"] == honest_updates and
                  all(r["updates"] == 3 for r in history[1:]),
                  "every round aggregated every honest update", [r["updates"] for r in history])
        run.counts["round_records"] = [{k: r[k] for k in ("updates", "failures", "rejected")}
                                       for r in history]
        check_clients_done(run, fed, honest, rounds)


@scenario("hostile_stalled_upload",
          "a member opens its upload, sends the header and then nothing: cut after "
          "stream_idle_timeout (1.5 s), counted stalled; the honest uploads go through")
def hostile_stalled_upload(run: Run) -> None:
    from fedmosaic.faults.hostile import header

    def attack(member: Any, task: Any, numel: int) -> dict[str, float]:
        answer, took = member.stalled_upload(header(task, numel), timeout=20)
        run.check(answer[0] == C.CANCELLED, "the stalled upload is cut (CANCELLED)", answer)
        run.check(took < 10.0, "cut within seconds of its idle timeout", took)
        run.counts["cut_after_s"] = round(took, 2)
        return {REJECTED % "stalled": 1, DROPPED % "stalled": 1}

    _hostile_run(run, attack)


@scenario("hostile_long_poll_flood",
          "a member sends 60 concurrent GetTask long polls: its budget (4) is served, the rest "
          "refused at once and counted over_budget; Status and the honest clients are answered")
def hostile_long_poll_flood(run: Run) -> None:
    flood = 60

    def before(member: Any, fed: Federation) -> dict[str, float]:
        seen: dict[str, float] = {}

        def status_during() -> None:
            time.sleep(1.0)  # the flood's held polls are in flight by now
            t0 = time.monotonic()
            if fed.status() is not None:
                seen["status_s"] = time.monotonic() - t0

        watcher = threading.Thread(target=status_during, daemon=True)
        watcher.start()
        codes = member.flood_polls(flood, wait=3.0)
        watcher.join(10)
        refused = sum(n for (code, _), n in codes.items() if code == C.RESOURCE_EXHAUSTED)
        served = sum(n for (code, _), n in codes.items() if code == C.OK)
        run.counts |= {"polls": flood, "served": served, "refused": refused,
                       "status_s": round(seen.get("status_s", -1.0), 3)}
        run.check(refused + served == flood, "every poll answered: served or refused", codes)
        run.check(served <= 4 and refused >= flood - 4,
                  "at most max_inflight_per_client (4) polls served", codes)
        run.check(seen.get("status_s", 99.0) < 1.0,
                  "the operator's Status answered within 1 s during the flood", seen)
        return {REJECTED % "over_budget": refused}

    def attack(member: Any, task: Any, numel: int) -> dict[str, float]:
        run.check(member.refuse(task)[0] == C.OK, "its task refused, the round goes on")
        return {}

    _hostile_run(run, attack, before_round=before)


@scenario("hostile_replayed_upload",
          "a member uploads a valid update, then replays it: the replay is refused "
          "(FAILED_PRECONDITION) and counted replay; the sum holds its one update")
def hostile_replayed_upload(run: Run) -> None:
    from fedmosaic.faults.hostile import chunks, header

    def attack(member: Any, task: Any, numel: int) -> dict[str, float]:
        parts = [header(task, numel), *chunks(np.zeros(numel, np.float32), CHUNK)]
        first = member.upload(parts)
        run.check(first[0] == C.OK, "its valid upload is accepted", first)
        again = member.upload(parts)
        run.check(again[0] == C.FAILED_PRECONDITION and "replay" in again[1],
                  "the replay is refused as a replay", again)
        return {REJECTED % "replay": 1}

    _hostile_run(run, attack, honest_updates=4)


@scenario("hostile_malformed_messages",
          "a member sends undecodable bytes to Join, Heartbeat and GetTask, and an upload whose "
          "second message is undecodable: each refused INVALID_ARGUMENT, counted malformed")
def hostile_malformed_messages(run: Run) -> None:
    from fedmosaic.faults.hostile import header

    def attack(member: Any, task: Any, numel: int) -> dict[str, float]:
        answers = [member.unary(m, b"\xff\xff\xff\xff garbage")[0][0]
                   for m in ("Join", "Heartbeat", "GetTask")]
        run.check(answers == [C.INVALID_ARGUMENT] * 3, "undecodable calls refused", answers)
        upload = member.upload([header(task, numel), b"\xff\xff\xff\xff garbage"])
        run.check(upload[0] == C.INVALID_ARGUMENT, "an undecodable upload message is refused",
                  upload)
        return {REJECTED % "malformed": 4, DROPPED % "rejected": 1}

    _hostile_run(run, attack)


@scenario("hostile_oversized_messages",
          "a member sends a Join over the message limit and an upload chunk over it: refused "
          "RESOURCE_EXHAUSTED before decoding, counted oversized, its task rejected")
def hostile_oversized_messages(run: Run) -> None:
    from fedmosaic.faults.hostile import header
    from fedmosaic.net.proto import fedmosaic_pb2 as pb

    def attack(member: Any, task: Any, numel: int) -> dict[str, float]:
        join = member.unary("Join", b"\x0a" * (LIMIT + 1))[0]
        run.check(join[0] == C.RESOURCE_EXHAUSTED, "an oversized Join is refused", join)
        big = pb.UploadMessage(chunk=pb.TensorChunk(offset=0, data=b"\0" * (LIMIT + 4000)))
        upload = member.upload([header(task, numel), big.SerializeToString()])
        run.check(upload[0] in (C.RESOURCE_EXHAUSTED, C.CANCELLED),
                  "an oversized upload chunk is refused", upload)
        return {REJECTED % "oversized": 2, DROPPED % "rejected": 1}

    _hostile_run(run, attack)


@scenario("hostile_nan_update",
          "a member uploads an update with a NaN: refused INVALID_ARGUMENT, counted non_finite, "
          "the round aggregates the honest updates only")
def hostile_nan_update(run: Run) -> None:
    from fedmosaic.faults.hostile import chunks, header

    def attack(member: Any, task: Any, numel: int) -> dict[str, float]:
        values = np.zeros(numel, np.float32)
        values[numel // 2] = np.nan
        answer = member.upload([header(task, numel), *chunks(values, CHUNK)])
        run.check(answer[0] == C.INVALID_ARGUMENT, "the NaN update is refused", answer)
        return {REJECTED % "non_finite": 1, DROPPED % "rejected": 1}

    _hostile_run(run, attack)


# --- bad certificates ---------------------------------------------------------------------------


def _expired_credential(fed: Federation, out: Path) -> tuple[Path, Path]:
    """A client certificate issued by the federation's CA whose validity ended yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from fedmosaic.net.certs import FederationPaths

    paths = FederationPaths(fed.credentials)
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmosaic federation"),
                      x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "client"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "late")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=30))
            .not_valid_after(now - dt.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    (out / "late.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "late.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    return out / "late.pem", out / "late.key"


def _handshake(port: int, ca: Path, cert: Path | None, key: Path | None) -> grpc.StatusCode:
    from fedmosaic.net.proto import fedmosaic_pb2 as pb

    creds = grpc.ssl_channel_credentials(ca.read_bytes(), key.read_bytes() if key else None,
                                         cert.read_bytes() if cert else None)
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
    try:
        channel.unary_unary("/fedmosaic.v1.Federation/Join")(
            pb.JoinRequest(spec_hash="x").SerializeToString(), timeout=5)
        return C.OK
    except grpc.RpcError as exc:
        return exc.code()
    finally:
        channel.close()


@scenario("bad_certificates",
          "calls with no client certificate, one from a foreign CA, an expired one and a "
          "revoked one during a run: the first three fail the TLS handshake and are counted "
          "by kind (no_certificate, unknown_ca, expired) in /metrics and fedmosaic status, "
          "the revoked one is refused and counted revoked; a revoked fedmosaic client exits "
          "3; the honest run is whole")
def bad_certificates(run: Run) -> None:
    from fedmosaic.net.certs import FederationPaths, create_federation, revoke

    with _federation(run, rounds=2, server={"linger": 3.0}, extra=["spare"]) as fed:
        paths = FederationPaths(fed.credentials)
        revoke(fed.credentials, "spare")
        foreign = FederationPaths(create_federation(run.root / "foreign", clients=[fed.ids[0]],
                                                    ca_passphrase=None).root)
        late_cert, late_key = _expired_credential(fed, run.root / "late")
        fed.server()
        fed.client("spare", name="revoked_client")
        fed.wait_endpoint()
        port = fed.endpoint["port"]
        baseline = fed.metrics()
        codes = {
            "no_certificate": _handshake(port, paths.ca_cert, None, None),
            "foreign_ca": _handshake(port, paths.ca_cert, foreign.client_cert(fed.ids[0]),
                                     foreign.client_key(fed.ids[0])),
            "expired": _handshake(port, paths.ca_cert, late_cert, late_key),
            "revoked": _handshake(port, paths.ca_cert, paths.client_cert("spare"),
                                  paths.client_key("spare")),
        }
        run.counts["codes"] = {k: v.name for k, v in codes.items()}
        run.check(codes["no_certificate"] == codes["foreign_ca"] == codes["expired"]
                  == C.UNAVAILABLE, "no, foreign-CA and expired certificates fail the "
                  "handshake", codes)
        run.check(codes["revoked"] == C.PERMISSION_DENIED, "a revoked certificate is refused",
                  codes)
        want = {REJECTED % "revoked": baseline[REJECTED % "revoked"] + 1,
                **{HANDSHAKE % kind: baseline.get(HANDSHAKE % kind, 0.0) + 1
                   for kind in ("no_certificate", "unknown_ca", "expired")}}
        got = settled(fed, want, 10.0)
        run.check(got == want, "each refused handshake counted once by its kind, the revoked "
                  "call once as revoked", {k: got[k] - baseline.get(k, 0.0) for k in want})
        status = fed.status_cli().get("tls_handshake_failures", {})
        run.counts["status_tls_handshake_failures"] = {k: v for k, v in status.items() if v}
        run.check(all(status.get(kind) == got[HANDSHAKE % kind]
                      for kind in ("no_certificate", "unknown_ca", "expired")),
                  "fedmosaic status shows the same handshake counts", status)
        for cid in fed.ids:  # the honest run, once the server has been read back
            fed.client(cid, fit_delay=0.5)
        rc = fed.wait("revoked_client", run.left(60))
        run.check(rc == 3 and "revoked" in fed.log("revoked_client"),
                  "a fedmosaic client with a revoked credential exits 3 naming it", rc)
        check_server_done(run, fed, run.left(90))
        log = fed.log("server")
        run.check(all(f"refused a TLS handshake ({kind})" in log
                      for kind in ("no_certificate", "unknown_ca", "expired")),
                  "the server logged each refused handshake with its kind")
        check_rounds_once(run, fed, 2, updates=3)
        check_clients_done(run, fed, fed.ids, 2)
        check_model_is_simulation(run, fed)


# --- network faults through the proxy ----------------------------------------------------------


def _proxied_run(run: Run, inject: Callable[[Federation, FaultProxy], None], *,
                 rounds: int = 3, fit_delay: float | None = 0.5,
                 server: dict[str, Any] | None = None) -> FaultProxy:
    """Every client dials the server through one ``FaultProxy``; ``inject(fed, proxy)`` runs
    once the clients are started; then the run must complete, each round once with every
    client, and equal the simulation."""
    with _federation(run, rounds=rounds, server={**_KILL_SERVER, **(server or {})},
                     strategy=_EVERY_UPDATE) as fed:
        fed.server()
        # Clients may dial before the server listens: the proxy then resets them (its
        # upstream refused) and they retry, as against the server itself.
        with FaultProxy(("127.0.0.1", fed.port), max_connection_seconds=run.budget) as proxy:
            for cid in fed.ids:
                fed.client(cid, address=proxy.address, fit_delay=fit_delay)
            fed.wait_endpoint()
            inject(fed, proxy)
            check_server_done(run, fed, run.left(120))
            check_clients_done(run, fed, fed.ids, rounds)
            stats = proxy.stats()
        run.counts["proxy"] = stats
        run.check(stats["accepted"] >= 3 and stats["bytes_up"] > 0 and stats["bytes_down"] > 0,
                  "every client went through the proxy", stats)
        check_rounds_once(run, fed, rounds, updates=3)
        check_checkpoint(run, fed, rounds)
        check_model_is_simulation(run, fed)
    return proxy


@scenario("net_delay",
          "50 ms added to every chunk both ways for the whole run: it completes, the model "
          "equals the simulation")
def net_delay(run: Run) -> None:
    def inject(fed: Federation, proxy: FaultProxy) -> None:
        proxy.set_fault(Fault(delay=0.05))

    _proxied_run(run, inject, fit_delay=None)


@scenario("net_throttle",
          "every connection throttled to 20 kB/s each way for the whole run: it completes, "
          "the model equals the simulation")
def net_throttle(run: Run) -> None:
    def inject(fed: Federation, proxy: FaultProxy) -> None:
        proxy.set_fault(Fault(rate=20_000))

    _proxied_run(run, inject, fit_delay=None)


@scenario("net_throttle_below_minimum",
          "one client's uplink throttled to 500 B/s, below the documented minimum "
          "chunk_bytes / stream_idle_timeout (4096 / 3 s = 1,365 B/s): each of its uploads "
          "is cut as stalled and counted, the rounds aggregate the other two clients")
def net_throttle_below_minimum(run: Run) -> None:
    rounds, counted = 3, 2  # counters read after round 2, while round 3 keeps the server up
    server = {"chunk_bytes": CHUNK, "stream_idle_timeout": 3.0, "heartbeat_interval": 2.0,
              "linger": 3.0}
    with _federation(run, rounds=rounds, server=server) as fed:
        slow = fed.ids[2]
        fed.server()
        with FaultProxy(("127.0.0.1", fed.port), max_connection_seconds=run.budget) as proxy:
            # Each fit takes 1 s, so the throttle below is in place before the first upload.
            for cid in fed.ids:
                fed.client(cid, address=proxy.address if cid == slow else None, fit_delay=1.0)
            fed.wait_endpoint()
            baseline = {k: v for k, v in fed.metrics().items() if "stalled" in k}
            # Throttled once joined (a TLS handshake through such a link fails in gRPC), and
            # only the uplink: the model arrives at once, a 2.5 kB upload message takes 5 s.
            fed.wait_until(lambda: (st := fed.status()) is not None and
                           st.connected_clients >= 3, run.left(60), "every client joined")
            proxy.set_fault(Fault(rate_up=500))
            def rounds_done() -> float:  # metrics.json is written at the end of the run only
                with contextlib.suppress(OSError):
                    return fed.metrics().get("fedmosaic_rounds_completed_total", 0.0)
                return 0.0

            fed.wait_until(lambda: rounds_done() >= counted or
                           fed.procs["server"].poll() is not None, run.left(90),
                           f"round {counted} to end")
            # Round 3's stall comes 4 s later: a 1 s fit, then 3 s (stream_idle_timeout).
            want = {REJECTED % "stalled": baseline[REJECTED % "stalled"] + counted,
                    DROPPED % "stalled": baseline[DROPPED % "stalled"] + counted}
            got = settled(fed, want, 1.0) if fed.procs["server"].poll() is None else {}
            run.counts["proxy"] = proxy.stats()
            check_server_done(run, fed, run.left(60))
        run.check(got == want, "one stalled upload per round, counted as refusal and drop",
                  got)
        check_rounds_once(run, fed, rounds, updates=2)
        history = fed.history()
        run.check(all(r["failures"] == 1 for r in history), "the slow client's task failed in "
                  "each round", [r["failures"] for r in history])
        check_clients_done(run, fed, fed.ids[:2], rounds)
        rc = fed.wait(slow, run.left(30))
        run.counts["slow_client"] = {"exit_code": rc, "trained": _trained_rounds(fed.log(slow))}
        run.check(rc == 0 and "stalled UploadUpdate" in fed.log(slow),
                  "the slow client is told why (stalled) and exits 0 at DONE", rc)


@scenario("net_drop",
          "the server-to-client direction is held (a partition, connections kept open) for 4 s "
          "while round 2 trains, then heals: the run completes, each round once, the model "
          "equals the simulation")
def net_drop(run: Run) -> None:
    def inject(fed: Federation, proxy: FaultProxy) -> None:
        fed.wait_until(lambda: fed.round_open(2), run.left(60), "round 2")
        proxy.set_fault(Fault(drop_down=True))
        time.sleep(4.0)
        run.counts["held_connections"] = len(proxy.connections(open_only=True))
        proxy.clear()

    _proxied_run(run, inject)


@scenario("net_cut",
          "every connection reset (RST) while round 2 trains, and again after 200 bytes of "
          "each new connection for 2 s: clients reconnect, the run completes, each round "
          "once, the model equals the simulation")
def net_cut(run: Run) -> None:
    def inject(fed: Federation, proxy: FaultProxy) -> None:
        fed.wait_until(lambda: fed.round_open(2), run.left(60), "round 2")
        run.counts["cut_now"] = proxy.cut()
        proxy.set_fault(Fault(cut_after=200))
        time.sleep(2.0)
        proxy.clear()

    proxy = _proxied_run(run, inject)
    run.check(proxy.stats()["cut"] >= 3, "connections were cut", proxy.stats())


@scenario("net_refuse_then_accept",
          "the proxy resets every new connection for the clients' first 5 s: they retry with "
          "backoff, join, and the run completes")
def net_refuse_then_accept(run: Run) -> None:
    def inject(fed: Federation, proxy: FaultProxy) -> None:
        proxy.refuse(True)
        proxy.wait_for(lambda p: p.stats()["refused"] >= 3, run.left(30))
        time.sleep(2.0)
        proxy.refuse(False)

    proxy = _proxied_run(run, inject, rounds=2, fit_delay=None)
    run.check(proxy.stats()["refused"] >= 3, "connections were refused", proxy.stats())


@scenario("net_unreachable_budget",
          "a client whose every connection is refused gives up after its --retry-budget "
          "(3 s) with exit code 4 and the documented message", budget=60.0)
def net_unreachable_budget(run: Run) -> None:
    with _federation(run, rounds=1) as fed, FaultProxy(("127.0.0.1", 9)) as proxy:
        proxy.refuse(True)
        fed.port = proxy.port
        started = time.monotonic()
        fed.client(fed.ids[0], address=proxy.address, retry_budget=3.0)
        rc = fed.wait(fed.ids[0], run.left(45))
        took = time.monotonic() - started
        log = fed.log(fed.ids[0])
        run.counts |= {"exit_code": rc, "seconds": round(took, 1),
                       "refused": proxy.stats()["refused"]}
        run.check(rc == 4, "exit code 4 (server unreachable within --retry-budget)", rc)
        run.check("retry" in log.lower() or "unreachable" in log.lower(),
                  "the client says why it gave up", log[-500:])
        run.check(proxy.stats()["refused"] >= 2, "it retried before giving up", proxy.stats())


# client_sigkill_restart is left to the full suite: tests/net/test_e2e.py already kills
# clients mid-round in CI, and the whole suite must stay under 15 minutes on 2 cores.
CI_SELECTION = ("server_sigkill_checkpoint_write", "net_cut", "client_slow_first_fit")


def run_all(names: list[str] | None = None, *, on_result: Callable[[Result], None] | None = None
            ) -> list[Result]:
    results = []
    for name in names or list(SCENARIOS):
        result = run_scenario(name)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


def to_json(results: list[Result]) -> str:
    return json.dumps([r.row() for r in results], indent=1, default=str)
