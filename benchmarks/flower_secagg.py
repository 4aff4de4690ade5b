"""Flower 1.42's SecAgg+ (or plain FedAvg) on fixed client vectors, for secagg_compare.py.

Runs inside benchmarks/.venv-flower (see setup_flower_venv.sh), not the project's venv:

    benchmarks/.venv-flower/bin/python benchmarks/flower_secagg.py \
        --clients 100 --dim 100000 --rounds 2 --out result.json            # SecAgg+
    benchmarks/.venv-flower/bin/python benchmarks/flower_secagg.py \
        --clients 100 --dim 100000 --rounds 2 --plain --out result.json    # plain FedAvg

The task measures the aggregation protocol alone. Client ``i`` (its SuperNode's
``partition-id``) "trains" by returning the same float32 vector every round,
``np.random.default_rng([seed, i]).uniform(-1, 1, dim)``, with weight (``num_examples``) 1;
every one of the N clients takes part in every round (``fraction_fit=1``). The server runs
the legacy ``flwr.server.strategy.FedAvg`` under ``DefaultWorkflow`` inside a
``LegacyContext``, the way Flower documents SecAgg+ (the flower-secure-aggregation
example): ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` on the server, a
``NumPyClient`` ``ClientApp`` with ``mods=[secaggplus_mod]`` on the clients, all started with
``flwr.simulation.run_simulation`` on the Ray backend with 1 CPU per client actor. ``--plain``
keeps everything but uses Flower's default fit workflow and no ``secaggplus_mod``.

SecAgg+ parameters (``SecAggPlusWorkflow`` keywords):
  * num_shares: Flower's docs give no rule for a given N (their example uses 3 shares of 5
    clients); SecAgg+ (Bell et al., CCS 2020) wants a neighbourhood of size O(log N). The
    default here is ``min(N, 2 * ceil(log2 N) + 1)`` shares (odd, as Flower asks; each client
    keeps one share and sends one to each of its ``num_shares - 1`` ring neighbours): 15 at
    N = 100, 21 at N = 1000. ``--num-shares all`` gives every client all N shares (classic
    SecAgg; the server's Shamir reconstruction then costs O(N^2) and is impractical at N=1000).
  * reconstruction_threshold: ``round(2/3 * num_shares)`` (10 of 15, 14 of 21).
  * clipping_range 1.0 (the vectors lie in [-1, 1]); quantization_range 2**22 and
    modulus_range 2**32 (Flower's defaults; N * 2**22 < 2**32 holds up to N = 1023, so the
    masked sum cannot wrap); max_weight 1.0 (= every client's weight, as in Flower's
    example's demo mode) so that quantisation uses the full range; timeout None; no dropouts.

Measurements (all in the JSON written to --out):
  * round_seconds: server-side wall time between the ends of consecutive rounds, stamped
    when ``DefaultWorkflow`` calls the centralised ``evaluate_fn`` (after the initial
    parameters, then after every round). Before round 1 a readiness probe makes every Ray
    actor start, import this module and warm the crypto libraries (see ``wait_for_backend``),
    so Ray's start-up is not billed to round 1.
  * server_seconds: per round, the fit workflow's wall time minus the time spent inside
    ``grid.send_and_receive`` (a wrapper around the Grid measures it): the server-side
    protocol work (configure_fit, building the messages, summing the masked vectors, Shamir
    reconstruction, mask removal, dequantisation, FedAvg). ``stages`` splits both per
    SecAgg+ stage (a subclass of SecAggPlusWorkflow times each stage method). Note that in
    the simulation the SuperLink and Ray scheduling run in other threads of the server
    process during ``send_and_receive``; they are counted as communication, not server time.
  * client time: three mods wrap the ClientApp, ``[probe_mod, outer_timer, secaggplus_mod,
    inner_timer]`` (the first is the outermost). Per call, ``outer - inner`` is the time
    spent inside secaggplus_mod alone, excluding the wrapped NumPyClient (which is what
    inner_timer times: building the vector and Flower's legacy message conversion). Both
    wall time (perf_counter) and CPU time (``time.process_time()``, the whole actor
    process: secaggplus_mod's Shamir split runs in a thread pool) are kept; an actor runs
    one ClientApp call at a time. In --plain mode there is no secaggplus_mod, so outer and
    inner time the same thing and the protocol's client time is ~0.
    client_seconds_per_client is the CPU time inside secaggplus_mod per client per round.
  * bytes: probe_mod sums, for every TRAIN message a ClientApp receives (server -> client,
    "down") and returns (client -> server, "up"), the sizes of the records in the
    Message's content, using the rules of Flower's own ``Record.count_bytes()``:
    ArrayRecord = len(Array.data) (the serialised NumPy bytes, ~128-byte .npy header
    included) + len(key) per array; ConfigRecord = len(value) for str/bytes, 8 per
    int/float, 1 per bool (list elements likewise), + len(key) per entry; MetricRecord =
    8 per value + len(key). Message metadata, protobuf framing and transport overheads are
    not counted. Bytes are totalled per round and per stage; bytes_*_per_client are round 1's totals
    divided by N. Round 1 ships the float32 initial model; SecAgg+'s aggregate is float64
    (Flower dequantises to float64), so with SecAgg+ the global model sent in later rounds is
    twice as large (see bytes_down_total_per_round). bytes_*_arrays_per_client give the
    ArrayRecord part: down, the global model inside the fit instructions (not protocol
    traffic as such); up, plain FedAvg's update (SecAgg+ empties the ArrayRecord and sends
    the masked int64 vector as bytes in its ConfigRecord).
  * correctness: the aggregated vector is compared with the float64 mean of the N client
    vectors; SecAgg+'s stochastic quantisation errs by less than one step
    2 * clipping_range / quantization_range per client (plus float32 rounding in Flower's
    quantiser), so the check allows 2 steps; plain FedAvg is held to 1e-5.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# No network here: keep Flower's telemetry and Ray's usage stats from trying to phone home
# (read when flwr / ray are imported, hence before those imports).
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import flwr
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import GetPropertiesIns, NDArrays, Scalar, ndarrays_to_parameters
from flwr.common.constant import MessageTypeLegacy
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.default_workflows import default_fit_workflow
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from flwr.supercore.primitives.asymmetric import generate_key_pairs

CLIPPING_RANGE = 1.0
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
MAX_WEIGHT = 1.0
CLIENT_WEIGHT = 1  # every client's num_examples
PLAIN_TOLERANCE = 1e-5
LOG_ENV = "FLOWER_SECAGG_CLIENT_LOG_DIR"  # where the client mods append their records
STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")


# --------------------------------------------------------------------------- the task


def client_vector(seed: int, partition_id: int, dim: int) -> np.ndarray:
    """Client ``partition_id``'s fixed "update": dim float32 values, uniform in [-1, 1)."""
    rng = np.random.default_rng([seed, partition_id])
    return rng.uniform(-1.0, 1.0, dim).astype(np.float32)


def expected_mean(seed: int, num_clients: int, dim: int) -> np.ndarray:
    """The float64 mean of all clients' vectors: what FedAvg with equal weights must give."""
    total = np.zeros(dim, dtype=np.float64)
    for i in range(num_clients):
        total += client_vector(seed, i, dim)
    return total / num_clients


def default_num_shares(n: int) -> int:
    """A log-size SecAgg+ neighbourhood: ``min(n, 2 * ceil(log2 n) + 1)`` shares."""
    return min(n, 2 * math.ceil(math.log2(n)) + 1)


def resolve_secagg(n: int, num_shares: str, threshold: str) -> tuple[int, int]:
    """(num_shares, reconstruction_threshold) as integers for N clients."""
    if num_shares == "log":
        k = default_num_shares(n)
    elif num_shares == "all":
        k = n
    else:
        k = int(num_shares)
    if not 3 <= k <= n:
        raise ValueError(f"num_shares must be in [3, {n}], got {k}")
    if k < n and k % 2 == 0:
        raise ValueError(f"num_shares below N must be odd (Flower's SecAgg+ rule), got {k}")
    t = max(2, round(float(threshold) * k)) if "." in threshold else int(threshold)
    if not 2 <= t < k:
        raise ValueError(f"reconstruction threshold must be in [2, {k - 1}], got {t}")
    return k, t


# --------------------------------------------------------------------------- ClientApp


class VectorClient(NumPyClient):
    """Returns its fixed vector as the "trained" model; no training at all."""

    def __init__(self, partition_id: int) -> None:
        self.partition_id = partition_id

    def get_properties(self, config: dict[str, Scalar]) -> dict[str, Scalar]:
        """Readiness probe (see ``wait_for_backend``): warm the crypto code paths once."""
        sk, _ = generate_key_pairs()
        assert sk is not None
        secret = os.urandom(32)
        assert combine_shares(create_shares(secret, 2, 3)[:2]) == secret
        pseudo_rand_gen(secret, MODULUS_RANGE, [(1,), (16,)])
        return {"pid": os.getpid()}

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        dim = int(config["dim"])
        if parameters and parameters[0].size != dim:
            raise ValueError(f"global model has {parameters[0].size} values, expected {dim}")
        return [client_vector(int(config["seed"]), self.partition_id, dim)], CLIENT_WEIGHT, {}


def client_fn(context: Context) -> Any:
    return VectorClient(int(context.node_config["partition-id"])).to_client()


def _value_bytes(value: Any) -> int:
    if isinstance(value, bool):
        return 1
    if isinstance(value, (int, float)):
        return 8
    if isinstance(value, (str, bytes)):
        return len(value)
    raise TypeError(f"unexpected record value {type(value)}")


def record_bytes(record: Any) -> int:
    """A record's size by the rules of Flower's ``count_bytes`` (empty lists count 0)."""
    total = 0
    if isinstance(record, ArrayRecord):
        for key, array in record.items():
            total += len(array.data) + len(key)
        return total
    if isinstance(record, (ConfigRecord, MetricRecord)):
        for key, value in record.items():
            if isinstance(value, list):
                total += sum(_value_bytes(v) for v in value)
            else:
                total += _value_bytes(value)
            total += len(key)
        return total
    raise TypeError(f"unexpected record {type(record)}")


def content_bytes(content: RecordDict) -> tuple[int, int]:
    """(all records, ArrayRecords alone) in a Message's content, in bytes."""
    arrays = sum(record_bytes(r) for r in content.values() if isinstance(r, ArrayRecord))
    return sum(record_bytes(record) for record in content.values()), arrays


_CALL: dict[str, float] = {}  # the current call's timings (an actor runs one call at a time)


def probe_mod(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Outermost mod: bytes in and out of the ClientApp, and one log record per TRAIN call."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctxt)
    stage = "fit"
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        # read before secaggplus_mod pops the stage key from the incoming content
        stage = str(msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE, "?"))
    down, down_arrays = content_bytes(msg.content)
    _CALL.clear()
    out = call_next(msg, ctxt)
    up, up_arrays = content_bytes(out.content) if out.has_content() else (0, 0)
    log_dir = os.environ.get(LOG_ENV)
    if log_dir:
        rec = {
            "pid": os.getpid(),
            "node": msg.metadata.dst_node_id,
            "round": msg.metadata.group_id,
            "stage": stage,
            "down": down,
            "up": up,
            "down_arrays": down_arrays,
            "up_arrays": up_arrays,
            "error": out.has_error(),
            **_CALL,
        }
        with open(os.path.join(log_dir, f"client-{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(rec) + "\n")
    return out


def _timed_call(prefix: str, msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        return call_next(msg, ctxt)
    finally:
        _CALL[f"{prefix}_cpu"] = time.process_time() - c0
        _CALL[f"{prefix}_wall"] = time.perf_counter() - w0


# Module-level functions, not closures: Ray's cloudpickle ships closures by value, together
# with a private copy of the module globals they use (here _CALL), which probe_mod would not see.
def outer_timer(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Times everything inside it: secaggplus_mod and the ClientApp it wraps."""
    return _timed_call("outer", msg, ctxt, call_next)


def inner_timer(msg: Message, ctxt: Context, call_next: ClientAppCallable) -> Message:
    """Times the NumPyClient alone (and Flower's legacy message conversion around it)."""
    return _timed_call("inner", msg, ctxt, call_next)


secagg_client_app = ClientApp(
    client_fn=client_fn, mods=[probe_mod, outer_timer, secaggplus_mod, inner_timer]
)
plain_client_app = ClientApp(client_fn=client_fn, mods=[probe_mod, outer_timer, inner_timer])


# --------------------------------------------------------------------------- ServerApp

# Set by main() before the simulation starts; the ServerApp runs in a thread of this process.
RUN: dict[str, Any] = {}
EVAL_STAMPS: list[float] = []  # time.time() when evaluate_fn is entered, rounds 0..R
ERRORS: list[float] = []  # max |aggregate - expected mean| after rounds 1..R
ROUNDS: list[dict[str, Any]] = []  # per round: fit workflow wall / comm / server, stages


class TimedGrid:
    """Delegates to a Grid, adding up the wall time spent inside send_and_receive."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.comm_seconds = 0.0

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        t0 = time.perf_counter()
        try:
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        finally:
            self.comm_seconds += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class TimedSecAggPlusWorkflow(SecAggPlusWorkflow):
    """Flower's SecAggPlusWorkflow with each of its four stages timed."""

    def _timed(self, name: str, stage: Callable[..., bool], grid: Any, *args: Any) -> bool:
        comm0, t0 = grid.comm_seconds, time.perf_counter()
        ok = stage(grid, *args)
        wall, comm = time.perf_counter() - t0, grid.comm_seconds - comm0
        ROUNDS[-1]["stages"][name] = {"wall": wall, "comm": comm, "server": wall - comm}
        return ok

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._timed("setup", super().setup_stage, grid, context, state)

    def share_keys_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._timed("share_keys", super().share_keys_stage, grid, context, state)

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        stage = super().collect_masked_vectors_stage
        return self._timed("collect_masked_vectors", stage, grid, context, state)

    def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
        return self._timed("unmask", super().unmask_stage, grid, context, state)


def timed_fit(fit_workflow: Callable[[Any, Any], None]) -> Callable[[Any, Any], None]:
    """Wrap a fit workflow: its wall time, and how much of it was spent in the Grid."""

    def fit(grid: Any, context: Any) -> None:
        ROUNDS.append({"stages": {}})
        comm0, t0 = grid.comm_seconds, time.perf_counter()
        fit_workflow(grid, context)
        wall, comm = time.perf_counter() - t0, grid.comm_seconds - comm0
        ROUNDS[-1].update(wall=wall, comm=comm, server=wall - comm)

    return fit


def central_evaluate(
    server_round: int, parameters: NDArrays, config: dict[str, Scalar]
) -> tuple[float, dict[str, Scalar]]:
    """Stamps the end of each round, then checks the aggregate against the expected mean."""
    EVAL_STAMPS.append(time.time())
    if server_round == 0:
        return 0.0, {}
    got = np.asarray(parameters[0], dtype=np.float64).reshape(-1)
    err = float(np.max(np.abs(got - RUN["expected"])))
    ERRORS.append(err)
    print(
        f"[flower_secagg] round {server_round}: max |aggregate - mean| = {err:.3g}",
        file=sys.stderr,
        flush=True,
    )
    return err, {"max_abs_error": err}


def wait_for_backend(grid: Grid, n_probes: int) -> None:
    """Block until the Simulation Engine runs ClientApps, so round 1 does not pay for it.

    ``run_simulation`` starts the ServerApp thread first and only then Ray and the actor
    pool. A get_properties message per actor (repeated until every actor has answered one)
    makes each actor process start, import this module and run the crypto primitives once.
    """
    t0 = time.time()
    while len(node_ids := sorted(grid.get_node_ids())) < RUN["clients"]:
        time.sleep(0.05)
    pids: set[int] = set()
    for attempt in range(5):
        probes = [
            Message(
                compat.getpropertiesins_to_recorddict(GetPropertiesIns({})),
                dst_node_id=nid,
                message_type=MessageTypeLegacy.GET_PROPERTIES,
            )
            for nid in node_ids[attempt * n_probes : (attempt + 1) * n_probes] or node_ids[:1]
        ]
        replies = list(grid.send_and_receive(probes, timeout=600))
        if len(replies) != len(probes) or any(r.has_error() for r in replies):
            raise RuntimeError(f"backend readiness probe failed: {replies}")
        for r in replies:
            pids.add(int(compat.recorddict_to_getpropertiesres(r.content).properties["pid"]))
        if len(pids) >= n_probes:
            break
    RUN["warmup_seconds"] = time.time() - t0
    RUN["actor_pids"] = sorted(pids)
    print(
        f"[flower_secagg] backend ready after {RUN['warmup_seconds']:.2f} s; actors {pids}",
        file=sys.stderr,
        flush=True,
    )


server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    n, dim, seed = RUN["clients"], RUN["dim"], RUN["seed"]
    if RUN["warmup"]:
        wait_for_backend(grid, min(n, RUN["cpus"]))
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,  # no client-side evaluation
        min_fit_clients=n,
        min_available_clients=n,
        evaluate_fn=central_evaluate,
        on_fit_config_fn=lambda server_round: {"seed": seed, "dim": dim},
        initial_parameters=ndarrays_to_parameters([np.zeros(dim, dtype=np.float32)]),
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=RUN["rounds"]), strategy=strategy
    )
    if RUN["plain"]:
        fit_workflow: Callable[[Any, Any], None] = default_fit_workflow
    else:
        fit_workflow = TimedSecAggPlusWorkflow(
            num_shares=RUN["num_shares"],
            reconstruction_threshold=RUN["threshold"],
            max_weight=MAX_WEIGHT,
            clipping_range=CLIPPING_RANGE,
            quantization_range=QUANTIZATION_RANGE,
            modulus_range=MODULUS_RANGE,
        )
    workflow = DefaultWorkflow(fit_workflow=timed_fit(fit_workflow))
    workflow(TimedGrid(grid), legacy)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- results


def read_client_logs(log_dir: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    for path in sorted(log_dir.glob("client-*.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line]
    return records


def summarise_clients(records: list[dict[str, Any]], rounds: int, n: int) -> dict[str, Any]:
    """Per round: client time inside secaggplus_mod / the app, and bytes, by stage."""
    per_round: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        recs = [x for x in records if x["round"] == str(r)]
        by_stage: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for x in recs:
            s = by_stage[x["stage"]]
            s["calls"] += 1
            s["down_bytes"] += x["down"]
            s["up_bytes"] += x["up"]
            s["down_array_bytes"] += x["down_arrays"]
            s["up_array_bytes"] += x["up_arrays"]
            s["mod_cpu_s"] += x.get("outer_cpu", 0.0) - x.get("inner_cpu", 0.0)
            s["mod_wall_s"] += x.get("outer_wall", 0.0) - x.get("inner_wall", 0.0)
            s["app_cpu_s"] += x.get("inner_cpu", 0.0)
            s["app_wall_s"] += x.get("inner_wall", 0.0)
        stages = {k: dict(v) for k, v in by_stage.items()}

        def total(key: str, stages: dict[str, dict[str, float]] = stages) -> float:
            return sum(s[key] for s in stages.values())

        per_round.append(
            {
                "round": r,
                "calls": len(recs),
                "errors": sum(bool(x.get("error")) for x in recs),
                "clients_seen": len({x["node"] for x in recs}),
                "down_bytes_total": int(total("down_bytes")),
                "up_bytes_total": int(total("up_bytes")),
                "down_array_bytes_total": int(total("down_array_bytes")),
                "up_array_bytes_total": int(total("up_array_bytes")),
                "mod_cpu_s_total": total("mod_cpu_s"),
                "mod_wall_s_total": total("mod_wall_s"),
                "app_cpu_s_total": total("app_cpu_s"),
                "app_wall_s_total": total("app_wall_s"),
                "stages": stages,
            }
        )
    return {
        "per_round": per_round,
        # round 1: every run (any R, plain or not) then ships the same float32 global model
        "bytes_down_per_client": round(per_round[0]["down_bytes_total"] / n),
        "bytes_up_per_client": round(per_round[0]["up_bytes_total"] / n),
        "bytes_down_arrays_per_client": round(per_round[0]["down_array_bytes_total"] / n),
        "bytes_up_arrays_per_client": round(per_round[0]["up_array_bytes_total"] / n),
        "mod_cpu_s_per_client": statistics.mean(p["mod_cpu_s_total"] for p in per_round) / n,
        "mod_wall_s_per_client": statistics.mean(p["mod_wall_s_total"] for p in per_round) / n,
        "app_cpu_s_per_client": statistics.mean(p["app_cpu_s_total"] for p in per_round) / n,
    }


# --------------------------------------------------------------------------- driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--clients", type=int, required=True, help="N, all of them every round")
    p.add_argument("--dim", type=int, default=100_000, help="parameters per client vector")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plain", action="store_true", help="plain FedAvg, no SecAgg+")
    p.add_argument(
        "--num-shares",
        default="log",
        help="'log' (min(N, 2*ceil(log2 N)+1), the default), 'all' (= N), or an integer",
    )
    p.add_argument(
        "--threshold",
        default="0.6667",
        help="reconstruction threshold: a fraction of num_shares (with a '.') or an integer",
    )
    p.add_argument("--out", type=Path, required=True, help="where to write the result JSON")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1, help="CPUs Ray may use")
    p.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="start round 1 at once, so that it includes the engine's start-up",
    )
    args = p.parse_args(argv)
    if args.clients < 3:
        p.error("need --clients >= 3 (SecAgg+ needs num_shares > 2)")
    if args.dim < 1 or args.rounds < 1:
        p.error("need --dim >= 1 and --rounds >= 1")
    try:
        args.k, args.t = resolve_secagg(args.clients, args.num_shares, args.threshold)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    n = args.clients
    t_expected = time.perf_counter()
    RUN.update(
        clients=n,
        dim=args.dim,
        rounds=args.rounds,
        seed=args.seed,
        cpus=args.cpus,
        warmup=args.warmup,
        plain=args.plain,
        num_shares=args.k,
        threshold=args.t,
        expected=expected_mean(args.seed, n, args.dim),
    )
    expected_s = time.perf_counter() - t_expected

    backend_config = {
        "init_args": {"num_cpus": args.cpus, "num_gpus": 0, "include_dashboard": False},
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
    }
    log_dir = Path(tempfile.mkdtemp(prefix="flower_secagg_"))
    os.environ[LOG_ENV] = str(log_dir)  # inherited by Ray's raylet and its worker processes
    try:
        t0 = time.time()
        run_simulation(
            server_app=server_app,
            client_app=plain_client_app if args.plain else secagg_client_app,
            num_supernodes=n,
            backend_name="ray",
            backend_config=backend_config,
        )
        t_end = time.time()
        records = read_client_logs(log_dir)
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(log_dir)

    if len(EVAL_STAMPS) != args.rounds + 1 or len(ROUNDS) != args.rounds:
        print(
            f"[flower_secagg] simulation ended after {len(EVAL_STAMPS) - 1} of "
            f"{args.rounds} rounds",
            file=sys.stderr,
        )
        return 1
    if not records:
        print(f"[flower_secagg] no client records: did the actors see ${LOG_ENV}?", file=sys.stderr)
        return 1
    clients = summarise_clients(records, args.rounds, n)
    expected_calls = n * (1 if args.plain else len(STAGES))
    complete = all(
        p["calls"] == expected_calls and p["errors"] == 0 and p["clients_seen"] == n
        for p in clients["per_round"]
    )
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    bound = PLAIN_TOLERANCE if args.plain else 2 * step
    max_err = max(ERRORS)
    round_seconds = [b - a for a, b in itertools.pairwise(EVAL_STAMPS)]
    server_seconds = [r["server"] for r in ROUNDS]
    mode = "plain" if args.plain else "secagg+"
    payload: dict[str, Any] = {
        "framework": f"flower-{mode}",
        "mode": mode,
        "version": flwr.__version__,
        "clients": n,
        "dim": args.dim,
        "rounds": args.rounds,
        "seed": args.seed,
        "first_round_start_unix": EVAL_STAMPS[0],
        "round_seconds": round_seconds,
        "fit_seconds": [r["wall"] for r in ROUNDS],
        "comm_seconds": [r["comm"] for r in ROUNDS],
        "server_seconds_per_round": server_seconds,
        "server_seconds": statistics.median(server_seconds),
        # CPU time inside secaggplus_mod per client and round (0 for plain FedAvg)
        "client_seconds_per_client": 0.0 if args.plain else clients["mod_cpu_s_per_client"],
        "client_wall_seconds_per_client": 0.0 if args.plain else clients["mod_wall_s_per_client"],
        "client_app_cpu_seconds_per_client": clients["app_cpu_s_per_client"],
        "bytes_up_per_client": clients["bytes_up_per_client"],
        "bytes_down_per_client": clients["bytes_down_per_client"],
        # of which ArrayRecords: down, the global model in the fit instructions; up, the
        # plain update (SecAgg+ sends its masked vector in a ConfigRecord instead)
        "bytes_down_arrays_per_client": clients["bytes_down_arrays_per_client"],
        "bytes_up_arrays_per_client": clients["bytes_up_arrays_per_client"],
        # later rounds may differ: SecAgg+ hands FedAvg a float64 aggregate, so from round 2
        # on the global model (sent to every client) is float64, twice round 1's float32
        "bytes_up_total_per_round": [p["up_bytes_total"] for p in clients["per_round"]],
        "bytes_down_total_per_round": [p["down_bytes_total"] for p in clients["per_round"]],
        "max_abs_error": max_err,
        "max_abs_error_per_round": ERRORS,
        "error_bound": bound,
        "correct": bool(max_err <= bound) and complete,
        "all_clients_every_round": complete,
        "server_stages": [r["stages"] for r in ROUNDS],
        "client_rounds": clients["per_round"],
        "secagg": None
        if args.plain
        else {
            "num_shares": args.k,
            "reconstruction_threshold": args.t,
            "rule": f"num_shares={args.num_shares}, threshold={args.threshold}",
            "clipping_range": CLIPPING_RANGE,
            "quantization_range": QUANTIZATION_RANGE,
            "modulus_range": MODULUS_RANGE,
            "max_weight": MAX_WEIGHT,
            "client_weight": CLIENT_WEIGHT,
            "quantization_step": step,
        },
        "warmup": args.warmup,
        "warmup_seconds": RUN.get("warmup_seconds"),
        "actor_pids": RUN.get("actor_pids"),
        "expected_mean_seconds": expected_s,
        "run_simulation_start_unix": t0,
        "last_round_end_unix": EVAL_STAMPS[-1],
        "run_simulation_end_unix": t_end,
        "backend": "ray",
        "backend_config": backend_config,
        "numpy": np.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(
        f"[flower_secagg] {mode} N={n} dim={args.dim}: rounds "
        f"{[round(s, 3) for s in round_seconds]} s, server {payload['server_seconds']:.3f} s, "
        f"client {payload['client_seconds_per_client'] * 1e3:.2f} ms/client, up "
        f"{payload['bytes_up_per_client']} B/client, down {payload['bytes_down_per_client']} "
        f"B/client, max error {max_err:.3g} (bound {bound:.3g}), correct {payload['correct']}",
        file=sys.stderr,
    )
    return 0 if payload["correct"] else 3


if __name__ == "__main__":
    # Run from the importable module rather than from __main__, as a Flower App's code is:
    # Ray's cloudpickle then ships the ClientApp's functions by reference (the actors import
    # this module once, via the PYTHONPATH Flower forwards) instead of by value per message.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import flower_secagg

    raise SystemExit(flower_secagg.main())
