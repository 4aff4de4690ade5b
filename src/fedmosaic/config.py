"""Experiment files (TOML): schema, validation and construction of the run's pieces.

Every key is checked; a wrong one raises ``ConfigError`` naming the key, the value and what
is allowed. Unknown keys are errors too (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmosaic.core.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATASETS = ("heart_disease", "digits", "fashion_mnist", "synthetic", "files", "custom")
NATURAL_DATASETS = ("heart_disease", "synthetic")
# The user's own data: one file per client, or a loader function (fedmosaic.data.files).
USER_DATASETS = ("files", "custom")
DATA_SUFFIXES = (".npz", ".csv", ".parquet")
# A client id names a certificate in deployment: the same pattern as
# fedmosaic.net.certs.CLIENT_ID_PATTERN (a test checks they agree; not imported: grpc and
# cryptography are slow to import and the config is read by every command).
CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SPEC = re.compile(r".+:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
SPEC_ALLOWED = "'module:attribute' or 'path/to/file.py:attribute' (e.g. 'task:make_trainer')"
PARTITIONS = ("iid", "dirichlet", "shards")
MODELS = ("logreg", "mlp", "cnn")
STRATEGIES = ("fedavg", "fedprox")
# When the server dispatches and aggregates (issue #11, fedmosaic.runtime.schedule); the keys
# each asynchronous schedule takes besides ``schedule``.
SCHEDULES = ("sync", "fedbuff", "fedasync")
SCHEDULE_KEYS = {
    "sync": set(),
    "fedbuff": {"buffer_size", "concurrency", "staleness", "staleness_a", "staleness_b"},
    "fedasync": {"alpha", "concurrency", "staleness", "staleness_a", "staleness_b"},
}
SCHEDULE_REQUIRED = {"fedbuff": ("buffer_size", "concurrency"),
                     "fedasync": ("alpha", "concurrency")}
STALENESS = ("constant", "polynomial", "hinge", "inverse_sqrt")
SERVER_OPTS = ("sgd", "fedavgm", "fedadagrad", "fedadam", "fedyogi")
OPTIMIZERS = ("sgd", "adam")
WEIGHTINGS = ("samples", "uniform")
# "auto" (the default, fedmosaic.runtime.auto) picks sequential, batched, parallel or
# parallel-batched for the model, the device, the cohort and the usable cores.
TRANSPORTS = ("auto", "sequential", "batched", "parallel", "ray")
# [runtime] secure_aggregation: SecAgg+ masking (one server) or additive secret sharing over
# several non-colluding aggregators (privacy/shares.py).
SECURE_AGGREGATION = ("secagg+", "shares")
PRIVACY_MODES = ("none", "central", "distributed", "local")
PRIVACY_KEYS = {
    "none": set(),
    "central": {"clip", "delta", "noise_multiplier", "target_epsilon", "budget_epsilon",
                "sampling", "rate", "adaptive_clip_quantile", "accountant", "secure_noise",
                "accountant_conversion", "accountant_orders",
                "insecure_seeded_noise", "client_metrics"},
    "local": {"clip", "mechanism", "noise_multiplier", "epsilon", "client_metrics"},
}
PRIVACY_KEYS["distributed"] = (PRIVACY_KEYS["central"] - {"adaptive_clip_quantile"}) | {
    "min_contributors", "mechanism", "bits", "max_clients"}
# Keys of the distributed Skellam mechanism only (privacy.mechanism = "skellam").
SKELLAM_KEYS = {"bits", "max_clients"}
# Parameters of each simulated attack (besides kind, fraction and seed).
ATTACK_KEYS = {
    "label_flip": {"source", "target"},
    "sign_flip": {"scale"},
    "gaussian": {"std"},
    "backdoor": {"target", "poison_fraction", "trigger_size", "trigger_value", "gamma"},
    "alie": {"z"},
    "ipm": {"epsilon"},
}
# Byzantine-robust aggregation rules (fedmosaic.robust) and the parameters each takes.
ROBUST_KEYS = {
    "krum": {"f"},
    "multikrum": {"f", "m"},
    "median": {"f"},
    "trimmed_mean": {"f", "beta"},
    "bulyan": {"f"},
    "geomed": {"f", "iters"},
    "centered_clip": {"f", "tau", "iters"},
    "fltrust": {"root_samples"},
    "norm_bound": {"max_norm", "noise_std"},
}
ROBUST_REQUIRED = {"centered_clip": "tau", "norm_bound": "max_norm"}
# Simulated client timing (issue #11, fedmosaic.runtime.clock): defaults filled in only when
# a [clock] table is given, so that a run without one keeps its resume identity.
CLOCK_DEFAULTS = {"compute_median": 0.005, "compute_unit": "sample", "speed_sigma": 1.0,
                  "jitter": 0.0, "latency": 0.0}
CLOCK_SIGMA = ("a number in [0, 4]", lambda v: 0 <= v <= 4)
TRANSPORT_KEYS = {
    "auto": {"workers"},  # at most this many worker processes, if it picks a parallel kind
    "sequential": set(),
    "batched": {"memory_budget_mb", "max_clients_per_chunk", "batching"},
    "parallel": {"workers", "inner"},
    "ray": {"workers", "address", "cpus", "gpus", "memory_mb", "runtime_env", "inner",
            "start_timeout_s", "round_timeout_s"},
}


@dataclass(frozen=True)
class Key:
    """One allowed key: its type(s), a check, a description of what is allowed, a default."""

    types: tuple[type, ...]
    allowed: str
    check: Callable[[Any], bool] = lambda v: True
    default: Any = None
    required: bool = False


def _int(lo: int, hi: int | None = None, default: Any = None, required: bool = False) -> Key:
    desc = f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else "")
    return Key((int,), desc, lambda v: v >= lo and (hi is None or v <= hi), default, required)


def _float(desc: str, check: Callable[[Any], bool], default: Any = None) -> Key:
    return Key((int, float), desc, check, default)


def _choice(options: tuple[str, ...], default: Any = None, required: bool = False) -> Key:
    return Key((str,), "one of " + ", ".join(repr(o) for o in options),
               lambda v: v in options, default, required)


def _orders_ok(value: Any) -> bool:
    from fedmosaic.privacy.accountant import ORDER_GRIDS

    if isinstance(value, str):
        return value in ORDER_GRIDS
    return bool(value) and all(isinstance(o, (int, float)) and not isinstance(o, bool)
                               and math.isfinite(o) and o > 1 for o in value)


POSITIVE = ("a number > 0", lambda v: v > 0)
UNIT = ("a number in [0, 1)", lambda v: 0 <= v < 1)

SCHEMA: dict[str, dict[str, Key]] = {
    "": {
        "name": Key((str,), "a non-empty string", lambda v: bool(v.strip()), "experiment"),
        "seed": _int(0, default=0),
        "rounds": _int(1, 100_000, required=True),
        "output": Key((str,), "a directory path", lambda v: bool(v.strip())),
        "eval_every": _int(1, default=1),
        # Clients train one after another, so intra-op threads only help big models; on small
        # ones they cost far more than they give (30x slower measured on 2 busy cores).
        "threads": _int(0, 1024, default=1),
    },
    "data": {
        "dataset": _choice(DATASETS, required=True),
        "test_fraction": _float("a number in (0, 1)", lambda v: 0 < v < 1),
        "limit_train": _int(1),
        "root": Key((str,), "a directory path", lambda v: bool(v)),
        "alpha": _float("a number >= 0", lambda v: v >= 0),
        "beta": _float("a number >= 0", lambda v: v >= 0),
        "num_devices": _int(1, 10_000),
        # dataset = "files" / "custom" (docs/own-model.md)
        "clients": Key((dict, list), "a table {client id = data file} (dataset 'files') or a "
                       "list of client ids (dataset 'custom')", lambda v: len(v) > 0),
        "label": Key((str,), "the name of the label column", lambda v: bool(v.strip())),
        "features": Key((list,), "a non-empty list of column names",
                        lambda v: bool(v) and all(isinstance(f, str) and f for f in v)),
        "test": Key((str,), "a data file (.npz, .csv or .parquet), relative to the experiment "
                    "file", lambda v: bool(v.strip())),
        "num_classes": _int(1, 2**24),
        "feature_shape": Key((list,), "a non-empty list of positive integers (one sample's "
                             "shape, e.g. [13])", lambda v: bool(v) and len(v) <= 8 and all(
                                 isinstance(d, int) and not isinstance(d, bool) and d > 0
                                 for d in v)),
        "loader": Key((str,), SPEC_ALLOWED, lambda v: bool(SPEC.fullmatch(v))),
        "test_loader": Key((str,), SPEC_ALLOWED, lambda v: bool(SPEC.fullmatch(v))),
    },
    "partition": {
        "method": _choice(PARTITIONS, default="iid"),
        "clients": _int(1, 1_000_000, default=10),
        "alpha": _float(*POSITIVE, default=0.5),
        "shards_per_client": _int(1, default=2),
        "min_size": _int(1, default=1),
    },
    "model": {
        # The user's own trainer (a Trainer or a zero-argument factory of one); excludes
        # kind and hidden, and limits [train] (see _check_model).
        "factory": Key((str,), SPEC_ALLOWED, lambda v: bool(SPEC.fullmatch(v))),
        "kind": _choice(MODELS, default="mlp"),
        "hidden": Key((list,), "a list of positive integers",
                      lambda v: all(isinstance(h, int) and h > 0 for h in v), [64]),
    },
    "train": {
        "lr": _float(*POSITIVE, default=0.05),
        "epochs": _int(1, default=1),
        "batch_size": _int(1, default=32),
        "optimizer": _choice(OPTIMIZERS, default="sgd"),
        "momentum": _float(*UNIT, default=0.0),
        "weight_decay": _float("a number >= 0", lambda v: v >= 0, default=0.0),
    },
    "strategy": {
        "name": _choice(STRATEGIES, default="fedavg"),
        "clients_per_round": _int(1),
        "fraction": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "min_available": _int(1, default=1),
        "min_updates": _int(1, default=1),
        "weighting": _choice(WEIGHTINGS, default="samples"),
        "mu": _float("a number >= 0", lambda v: v >= 0),
        "stragglers": _float(*UNIT, default=0.0),
        "drop_stragglers": Key((bool,), "true or false", default=False),
        # Asynchronous schedules (issue #11): no defaults, so that a run without them keeps
        # its resume identity (and "sync" is left out of the identity, see identity()).
        "schedule": _choice(SCHEDULES),
        "concurrency": _int(1, 1_000_000),
        "buffer_size": _int(1, 1_000_000),
        "alpha": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "staleness": _choice(STALENESS),
        "staleness_a": _float("a finite number >= 0", lambda v: 0 <= v < math.inf),
        "staleness_b": _float("a finite number >= 0", lambda v: 0 <= v < math.inf),
    },
    "runtime": {
        "transport": _choice(TRANSPORTS, default="auto"),
        "device": Key((str,), "'cpu', 'cuda' or 'cuda:N'",
                      lambda v: v == "cpu" or v == "cuda" or
                      (v.startswith("cuda:") and v[5:].isdigit()), "cpu"),
        "memory_budget_mb": _float(*POSITIVE),
        "max_clients_per_chunk": _int(1),
        "batching": _choice(("auto", "always")),
        "inner": _choice(("sequential", "batched")),
        "workers": Key((int, str), "an integer from 1 to 4096, or 'auto' (as many as the cores "
                       "or, for Ray, the cluster's free resources allow)",
                       lambda v: v == "auto" if isinstance(v, str) else 1 <= v <= 4096),
        "address": Key((str,), "a Ray cluster address, e.g. 'auto' or 'ray://host:10001'",
                       lambda v: bool(v.strip())),
        # Ray (issue #21): per-worker resources, what the nodes need, and every wait's limit.
        "cpus": _float(*POSITIVE),
        "gpus": _float("a number >= 0", lambda v: 0 <= v < math.inf),
        "memory_mb": _float(*POSITIVE),
        "runtime_env": Key((dict,), "a table Ray understands, e.g. {working_dir = '.'} or "
                           "{pip = ['package']}", lambda v: bool(v)),
        "start_timeout_s": _float(*POSITIVE),
        "round_timeout_s": _float(*POSITIVE),
        # true is "secagg+"; read back as False or the protocol's name (SECURE_AGGREGATION).
        "secure_aggregation": Key((bool, str), "false, true (= 'secagg+'), 'secagg+' or "
                                  "'shares'", lambda v: isinstance(v, bool) or
                                  v in SECURE_AGGREGATION, default=False),
        # 'shares': how many aggregators (run by different organisations) hold the shares.
        "shares_aggregators": _int(2, 16),
        "secagg_clip": _float(*POSITIVE),
        "secagg_max_weight": _float(*POSITIVE),
        "secagg_dropout_rate": _float("a number in [0, 1)", lambda v: 0 <= v < 1),
        # The fraction of members that may collude with a malicious server (t and k are sized
        # for it; clients check it against their own policy's bound).
        "secagg_corrupted_fraction": _float("a number in [0, 1)", lambda v: 0 <= v < 1),
    },
    # Deployment (`fedmosaic server`, issue #5); like [runtime] it may change on resume.
    "server": {
        "address": Key((str,), "a host name or IP address to listen on",
                       lambda v: bool(v.strip()), "0.0.0.0"),
        "port": _int(0, 65535, default=50051),
        "credentials": Key((str,), "a federation directory (fedmosaic certs init)",
                           lambda v: bool(v.strip())),
        "round_deadline": _float(*POSITIVE, default=600.0),
        "min_clients": _int(1, default=1),
        "wait_for_clients": _float(*POSITIVE, default=600.0),
        "heartbeat_interval": _float(*POSITIVE, default=5.0),
        "metrics_port": _int(0, 65535),
        "chunk_bytes": _int(1024, 64 * 1024 * 1024, default=1024 * 1024),
        "upload_slots": _int(1, 64, default=2),
        "max_workers": _int(1, 4096, default=128),
        "max_calls": _int(3, 1_000_000, default=16384),
        "round_retries": _int(0, 1000, default=3),
        "linger": _float("a number >= 0", lambda v: v >= 0, default=15.0),
        # Admission control (net/admission.py): per-member budgets, reserved capacity.
        "max_inflight_per_client": _int(1, 1024, default=4),
        "stream_idle_timeout": _float(*POSITIVE, default=30.0),
        "min_upload_rate": _float(*POSITIVE, default=32768.0),
        "reserved_rpcs": _int(2, 999_999),
        "max_queued_rpcs": _int(0, 1_000_000, default=512),
    },
    "privacy": {
        "mode": _choice(PRIVACY_MODES, default="none"),
        "clip": _float(*POSITIVE),
        "delta": _float("a number in (0, 1)", lambda v: 0 < v < 1),
        "noise_multiplier": _float(*POSITIVE),
        "target_epsilon": _float(*POSITIVE),
        "budget_epsilon": _float(*POSITIVE),
        "sampling": _choice(("poisson", "fixed")),
        "rate": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "adaptive_clip_quantile": _float("a number in (0, 1)", lambda v: 0 < v < 1),
        "mechanism": _choice(("gaussian", "laplace", "skellam")),
        # Distributed Skellam: the SecAgg+ ring and the largest sum its no-wrap bound covers.
        "bits": _int(2, 64),
        "max_clients": _int(1),
        "epsilon": _float(*POSITIVE),
        "accountant": _choice(("rdp", "pld")),
        # RDP only: the classic conversion and a paper's orders reproduce published epsilons.
        "accountant_conversion": _choice(("improved", "classic")),
        "accountant_orders": Key((str, list), "a grid name ('dp_accounting', 'tf_privacy', "
                                 "'moments_accountant') or a non-empty list of numbers > 1",
                                 lambda v: _orders_ok(v)),
        "min_contributors": _int(1),
        # Noise and cohorts from a CSPRNG keyed from os.urandom (fedmosaic.privacy.randomness);
        # no default: simulation uses seeded noise, ``fedmosaic server`` secure noise.
        "secure_noise": Key((bool,), "true or false"),
        # The loudly named opt-out that lets ``fedmosaic server`` run DP with seeded noise.
        "insecure_seeded_noise": Key((bool,), "true or false"),
        "client_metrics": _choice(("record", "suppress")),
    },
    "server_opt": {
        "name": _choice(SERVER_OPTS, default="sgd"),
        "lr": _float(*POSITIVE),
        "momentum": _float(*UNIT),
        "beta1": _float(*UNIT),
        "beta2": _float(*UNIT),
        "tau": _float(*POSITIVE),
    },
    # Byzantine-robust aggregation and anomaly detection (issue #6, fedmosaic.robust); no
    # defaults here, so that a run without the tables keeps its resume identity.
    "robust": {
        "aggregator": _choice(tuple(ROBUST_KEYS)),
        "f": _int(0),
        "m": _int(1),
        "beta": _float("a number in [0, 0.5)", lambda v: 0 <= v < 0.5),
        "tau": _float(*POSITIVE),
        "iters": _int(1, 10_000),
        "max_norm": _float(*POSITIVE),
        "noise_std": _float("a finite number >= 0", lambda v: 0 <= v < math.inf),
        "root_samples": _int(1),
    },
    "anomaly": {
        "enabled": Key((bool,), "true or false"),
        "z_threshold": _float(*POSITIVE),
        "cos_threshold": _float("a number in [-1, 1]", lambda v: -1 <= v <= 1),
        "forgetting": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "quarantine_after": _int(1),
        "min_reputation": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "quarantine_rounds": _int(0),
        "mad_floor": _float("a number in [0, 1)", lambda v: 0 <= v < 1),
    },
    # Model-theft protection (issue #6); no defaults here (see fedmosaic.watermark.from_config)
    # so that a run without the section keeps its resume identity.
    "watermark": {
        "key_file": Key((str,), "a key file path (fedmosaic watermark keygen)",
                        lambda v: bool(v.strip())),
        "waffle": Key((bool,), "true or false"),
        "threshold": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "target_accuracy": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "max_epochs": _int(1, 10_000),
        "lr": _float(*POSITIVE),
        "batch_size": _int(1),
        "patterns_per_class": _int(1, 10_000),
        "samples_per_pattern": _int(1, 10_000),
        "noise": _float("a number in [0, 1]", lambda v: 0 <= v <= 1),
        "density": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "fingerprint": Key((bool,), "true or false"),
        "fingerprint_strength": _float("a number in (0, 1)", lambda v: 0 < v < 1),
    },
    # A simulated attack, for evaluating defences (fedmosaic.attacks); no defaults, so that a
    # run without the table keeps its resume identity.
    "attack": {
        "kind": _choice(tuple(ATTACK_KEYS)),
        "fraction": _float("a number in (0, 1)", lambda v: 0 < v < 1),
        "seed": _int(0),
        "source": _int(0),
        "target": _int(0),
        "scale": _float(*POSITIVE),
        "std": _float(*POSITIVE),
        "poison_fraction": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "trigger_size": _int(1),
        "trigger_value": _float("a finite number", math.isfinite),
        "gamma": _float(*POSITIVE),
        "z": _float(*POSITIVE),
        "epsilon": _float(*POSITIVE),
    },
    # Simulated client timing for the virtual clock (issue #11, fedmosaic.runtime.clock); no
    # defaults here (see CLOCK_DEFAULTS and _check_clock).
    "clock": {
        "seed": _int(0),
        "compute_median": _float("a finite number > 0 (seconds per sample or per step)",
                                 lambda v: 0 < v < math.inf),
        "compute_unit": _choice(("sample", "step")),
        "speed_sigma": _float(*CLOCK_SIGMA),
        "jitter": _float(*CLOCK_SIGMA),
        "bandwidth_mbps": _float("a finite number > 0", lambda v: 0 < v < math.inf),
        "bandwidth_sigma": _float(*CLOCK_SIGMA),
        "latency": _float("a finite number >= 0 (seconds)", lambda v: 0 <= v < math.inf),
        "model_bytes": _int(1),
        "availability_period": _float("a finite number > 0 (seconds)",
                                      lambda v: 0 < v < math.inf),
        "availability_fraction": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "deadline": _float("a finite number > 0 (seconds)", lambda v: 0 < v < math.inf),
        "trace": Key((str,), "a trace CSV file path", lambda v: bool(v.strip())),
    },
    # Central and federated evaluation (fedmosaic.runtime.evaluation). No defaults here: they
    # depend on the data (a central test set, clients' local test splits) and are resolved by
    # fedmosaic.build.build_evaluation; evaluation never changes the model, so the table is
    # not part of the resume identity.
    "evaluation": {
        "central": Key((bool,), "true or false"),
        "federated": Key((bool,), "true or false"),
        "fraction": _float("a number in (0, 1]", lambda v: 0 < v <= 1),
        "clients": _int(1),
        "min_clients": _int(1),
    },
}

SERVER_OPT_KEYS = {
    "sgd": {"lr"},
    "fedavgm": {"lr", "momentum"},
    "fedadagrad": {"lr", "beta1", "tau"},
    "fedadam": {"lr", "beta1", "beta2", "tau"},
    "fedyogi": {"lr", "beta1", "beta2", "tau"},
}
DATA_KEYS = {
    "heart_disease": {"test_fraction"},
    "digits": {"test_fraction"},
    "fashion_mnist": {"root", "limit_train"},
    "synthetic": {"alpha", "beta", "num_devices", "test_fraction"},
    "files": {"clients", "label", "features", "test", "test_fraction", "num_classes",
              "feature_shape"},
    "custom": {"loader", "clients", "test_loader", "test_fraction", "num_classes",
               "feature_shape"},
}
# With [model] factory the trainer owns its optimizer; these [train] keys still apply: the
# server sends them to every client each round (FitConfig), overriding the trainer's own.
FACTORY_TRAIN_KEYS = ("lr", "epochs", "batch_size")


@dataclass
class Experiment:
    """A validated experiment: one dict per section, defaults filled in."""

    sections: dict[str, dict[str, Any]]
    source: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)
    # Where relative data paths and user modules ([data] clients/test/loader, [model]
    # factory) are found; None: the experiment file's directory (fedmosaic.build).
    base_dir: Path | None = None

    def __getitem__(self, section: str) -> dict[str, Any]:
        return self.sections[section]

    @property
    def name(self) -> str:
        return str(self.sections[""]["name"])

    @property
    def output(self) -> Path:
        out = self.sections[""].get("output")
        return Path(out) if out else Path("runs") / self.name

    def identity(self) -> dict[str, Any]:
        """What must not change between a run and its resume (everything but rounds/output)."""
        # The runtime (transport, device) may change too: every transport computes the same
        # model up to float rounding.
        top = {k: v for k, v in self.sections[""].items()
               if k not in ("rounds", "output", "threads")}
        sections = dict(self.sections)
        if sections["strategy"].get("schedule") == "sync":  # the default, said explicitly
            sections["strategy"] = {k: v for k, v in sections["strategy"].items()
                                    if k != "schedule"}
        return {**{s: v for s, v in sections.items()
                   if s and s not in ("runtime", "server", "evaluation") and v},  # empty: absent
                "": top}


def _check_value(section: str, key: str, spec: Key, value: Any) -> None:
    dotted = f"{section}.{key}" if section else key
    ok_type = isinstance(value, spec.types) and not (
        isinstance(value, bool) and bool not in spec.types
    )
    if not ok_type or not spec.check(value):
        raise ConfigError(dotted, value, spec.allowed)


def validate(raw: dict[str, Any], source: Path | None = None) -> Experiment:
    """Validate a parsed experiment dict and fill in defaults."""
    if not isinstance(raw, dict):
        raise ConfigError("<root>", raw, "a TOML table")
    sections: dict[str, dict[str, Any]] = {name: {} for name in SCHEMA}
    for key, value in raw.items():
        if key in SCHEMA and key != "":
            if not isinstance(value, dict):
                raise ConfigError(key, value, f"a [{key}] table")
            continue
        if key not in SCHEMA[""]:
            allowed = sorted(set(SCHEMA[""]) | {f"[{s}]" for s in SCHEMA if s})
            raise ConfigError(key, value, "one of the known keys: " + ", ".join(allowed))
    for section, keys in SCHEMA.items():
        given = raw if section == "" else raw.get(section, {})
        for key, value in given.items():
            if section == "" and key in SCHEMA:
                continue
            if key not in keys:
                dotted = f"{section}.{key}" if section else key
                known = ", ".join(sorted(keys))
                raise ConfigError(dotted, value, "one of the known keys: " + known)
            _check_value(section, key, keys[key], value)
            sections[section][key] = value
        for key, spec in keys.items():
            if key not in sections[section]:
                if spec.required:
                    dotted = f"{section}.{key}" if section else key
                    raise ConfigError(dotted, "<missing>", f"required: {spec.allowed}")
                if spec.default is not None:
                    sections[section][key] = spec.default
    _cross_check(sections, raw)
    return Experiment(sections=sections, source=source, raw=raw)


def _cross_check(s: dict[str, dict[str, Any]], raw: dict[str, Any]) -> None:
    dataset = s["data"]["dataset"]
    for key in set(raw.get("data", {})) - {"dataset"} - DATA_KEYS[dataset]:
        raise ConfigError(f"data.{key}", raw["data"][key],
                          f"for dataset '{dataset}' only: {', '.join(sorted(DATA_KEYS[dataset]))}")
    if dataset in NATURAL_DATASETS + USER_DATASETS and "partition" in raw:
        raise ConfigError("partition", raw["partition"],
                          f"no [partition] table: dataset '{dataset}' has its natural clients")
    _check_user_data(s["data"])
    _check_model(s, raw)
    strat = s["strategy"]
    if "clients_per_round" in strat and "fraction" in strat:
        raise ConfigError("strategy.fraction", strat["fraction"],
                          "only one of strategy.clients_per_round and strategy.fraction")
    if strat["name"] == "fedprox":
        strat.setdefault("mu", 0.01)
    elif "mu" in strat:
        raise ConfigError("strategy.mu", strat["mu"], "only with strategy.name = 'fedprox'")
    rt = s["runtime"]
    if rt["secure_aggregation"] is True:
        rt["secure_aggregation"] = "secagg+"
    secagg_keys = {"secure_aggregation", "secagg_clip", "secagg_max_weight",
                   "secagg_dropout_rate", "secagg_corrupted_fraction", "shares_aggregators"}
    if not rt["secure_aggregation"]:
        for key in sorted(set(rt) & (secagg_keys - {"secure_aggregation"})):
            raise ConfigError(f"runtime.{key}", rt[key], "only with secure_aggregation = true")
    only = {"secagg+": {"secagg_dropout_rate", "secagg_corrupted_fraction"},
            "shares": {"shares_aggregators"}}
    for mode, keys in only.items():
        for key in sorted(set(rt) & keys):
            if rt["secure_aggregation"] != mode:
                raise ConfigError(f"runtime.{key}", rt[key],
                                  f"only with secure_aggregation = '{mode}'")
    extra_rt = set(rt) - {"transport", "device"} - secagg_keys - TRANSPORT_KEYS[rt["transport"]]
    if extra_rt:
        key = sorted(extra_rt)[0]
        allowed = ", ".join(sorted(TRANSPORT_KEYS[rt["transport"]])) or "no extra keys"
        raise ConfigError(f"runtime.{key}", rt[key],
                          f"for transport '{rt['transport']}' only: {allowed}")
    _check_schedule(s, raw)  # before privacy: an async DP run is refused for its schedule
    _check_privacy(s)
    _check_watermark(s)
    _check_attack(s)
    _check_clock(s, raw)
    _check_robust(s)
    _check_evaluation(s)
    opt = s["server_opt"]
    extra = set(opt) - {"name"} - SERVER_OPT_KEYS[opt["name"]]
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(f"server_opt.{key}", opt[key],
                          f"for server_opt '{opt['name']}' only: "
                          + ", ".join(sorted(SERVER_OPT_KEYS[opt["name"]])))
    if s["model"].get("kind") == "cnn" and dataset != "fashion_mnist":
        raise ConfigError("model.kind", "cnn", "'cnn' needs image data (dataset 'fashion_mnist')")
    if s["train"].get("momentum") and s["train"]["optimizer"] != "sgd":
        raise ConfigError("train.momentum", s["train"]["momentum"], "only with optimizer 'sgd'")


def _check_schedule(s: dict[str, dict[str, Any]], raw: dict[str, Any]) -> None:
    """``[strategy] schedule``: each schedule's keys, and what asynchronous schedules cannot
    run yet (refused here with the reason, before any data is loaded)."""
    strat = s["strategy"]
    kind = strat.get("schedule", "sync")
    keys = set().union(*SCHEDULE_KEYS.values())
    for key in sorted((keys - SCHEDULE_KEYS[kind]) & set(strat)):
        users = [k for k, v in SCHEDULE_KEYS.items() if key in v]
        raise ConfigError(f"strategy.{key}", strat[key], "only with strategy.schedule = "
                          + " or ".join(repr(u) for u in users))
    if kind == "sync":
        return
    for key in SCHEDULE_REQUIRED[kind]:
        if key not in strat:
            raise ConfigError(f"strategy.{key}", "<missing>",
                              f"required with strategy.schedule = '{kind}': "
                              + SCHEMA["strategy"][key].allowed)
    func = strat.get("staleness", "inverse_sqrt" if kind == "fedbuff" else "constant")
    takes = {"polynomial": {"staleness_a"}, "hinge": {"staleness_a", "staleness_b"}}.get(func,
                                                                                         set())
    for key in sorted({"staleness_a", "staleness_b"} - takes):
        if key in strat:
            raise ConfigError(f"strategy.{key}", strat[key], "only with strategy.staleness = "
                              + ("'hinge'" if key == "staleness_b" else "'polynomial' or "
                                 "'hinge'"))
    given = raw.get("strategy", {})
    for key in ("clients_per_round", "fraction", "min_updates", "min_available"):
        if key in given:
            raise ConfigError(f"strategy.{key}", given[key], f"not with strategy.schedule = "
                              f"'{kind}': strategy.concurrency sets how many clients train at "
                              "once, and every arriving update counts")
    if strat["stragglers"] > 0:
        raise ConfigError("strategy.stragglers", strat["stragglers"], f"0 with strategy."
                          f"schedule = '{kind}': slow clients come from the [clock] table")
    if s["runtime"]["secure_aggregation"] == "shares":
        raise ConfigError("strategy.schedule", kind, "'sync' with secure_aggregation = "
                          "'shares': the aggregators sum one synchronous round's shares (a "
                          "FedBuff buffer over secret sharing is not built)")
    if s["runtime"]["secure_aggregation"]:
        # FedBuff runs one SecAgg+ instance per buffer (privacy/secagg/buffer.py); fedmosaic
        # server refuses it when the live schedule is checked (runtime/schedule.py).
        if kind != "fedbuff":
            raise ConfigError("strategy.schedule", kind, "'sync' or 'fedbuff' with secure "
                              "aggregation: FedAsync takes a server step on each update alone, "
                              "so there is no sum over several clients to mask")
        if s["privacy"].get("mechanism") == "skellam":
            raise ConfigError("strategy.schedule", kind, "'sync' with the Skellam mechanism: "
                              "its clients encode unweighted updates (no staleness weight) and "
                              "its noise, minimum contributors and accounting are per "
                              "synchronous round; FedBuff over SecAgg+ uses the fixed-point "
                              "quantizer only")
    if s["privacy"]["mode"] == "distributed":
        raise ConfigError("strategy.schedule", kind, "'sync' under distributed DP: its noise "
                          "shares and minimum contributors are per synchronous cohort (central "
                          "DP accounts each asynchronous server step: privacy.mode = 'central')")
    if s["privacy"]["mode"] == "central":
        # AsyncDPFedAvg (privacy/async_dp.py): each server step an unsampled Gaussian
        # mechanism; dispatch is not sampling, so the sampling keys would claim amplification.
        p = s["privacy"]
        for key, why in (("sampling", "asynchronous dispatch is not random sampling"),
                         ("rate", "asynchronous dispatch is not Poisson sampling"),
                         ("adaptive_clip_quantile", "adaptive clipping's noised count is "
                          "accounted per synchronous round only")):
            if key in p:
                raise ConfigError(f"privacy.{key}", p[key], f"not with strategy.schedule = "
                                  f"'{kind}': {why}; each server step is accounted as an "
                                  "unsampled Gaussian mechanism (no amplification)")
    if s["robust"] or s["anomaly"].get("enabled", False):
        raise ConfigError("strategy.schedule", kind, "'sync' with [robust] or [anomaly]: they "
                          "compare a whole cohort of updates, which an asynchronous server "
                          "step does not have (not yet supported)")


def _check_user_data(d: dict[str, Any]) -> None:
    """``[data] dataset = "files"`` / ``"custom"``: the clients and what they need."""
    dataset = d["dataset"]
    if dataset not in USER_DATASETS:
        return
    need = ("clients",) if dataset == "files" else ("loader", "clients")
    for key in need:
        if key not in d:
            what = {"clients": "a table {client id = data file}" if dataset == "files" else
                    "a list of client ids", "loader": SPEC_ALLOWED}[key]
            raise ConfigError(f"data.{key}", "<missing>", f"required for dataset '{dataset}': "
                              f"{what}")
    clients = d["clients"]
    if dataset == "files":
        if not isinstance(clients, dict):
            raise ConfigError("data.clients", clients, "a table {client id = data file} for "
                              "dataset 'files' (a list of ids is for dataset 'custom')")
        ids = list(clients)
        files = {f"data.clients.{cid}": path for cid, path in clients.items()}
        if "test" in d:
            files["data.test"] = d["test"]
        for key, path in files.items():
            if not isinstance(path, str) or not path.strip():
                raise ConfigError(key, path, "a data file path")
            if Path(path).suffix.lower() not in DATA_SUFFIXES:
                raise ConfigError(key, path, "a .npz (arrays x and y), .csv or .parquet file")
        tables = [k for k, p in files.items() if Path(p).suffix.lower() != ".npz"]
        if tables and "label" not in d:
            raise ConfigError("data.label", "<missing>", f"required with .csv/.parquet files "
                              f"({tables[0]}): the name of the label column")
        if "features" in d and "label" in d and d["label"] in d["features"]:
            raise ConfigError("data.features", d["features"], "feature columns other than the "
                              f"label column '{d['label']}'")
    else:
        if not isinstance(clients, list):
            raise ConfigError("data.clients", clients, "a list of client ids for dataset "
                              "'custom' (a table of files is for dataset 'files')")
        ids = clients
        for cid in ids:
            if not isinstance(cid, str):
                raise ConfigError("data.clients", cid, "client ids (strings)")
        dup = sorted({c for c in ids if ids.count(c) > 1})
        if dup:
            raise ConfigError("data.clients", dup[0], "each client id once")
    for cid in ids:
        if not CLIENT_ID.fullmatch(cid):
            raise ConfigError("data.clients", cid, "client ids of letters, digits, '.', '_' "
                              "and '-', starting with a letter or digit, at most 64 characters "
                              "(each names a client certificate in deployment)")


def _check_model(s: dict[str, dict[str, Any]], raw: dict[str, Any]) -> None:
    """``[model] factory``: the user's trainer builds the model and its optimizer."""
    factory = s["model"].get("factory")
    if factory is None:
        return
    given = raw.get("model", {})
    for key in ("kind", "hidden"):
        if key in given:
            raise ConfigError(f"model.{key}", given[key], "not with model.factory (the "
                              "factory's trainer builds the model)")
    s["model"] = {"factory": factory}  # no kind/hidden defaults: they do not apply
    train = raw.get("train", {})
    for key in sorted(set(train) - set(FACTORY_TRAIN_KEYS)):
        raise ConfigError(f"train.{key}", train[key], "not with model.factory (the factory's "
                          "trainer builds its own optimizer); [train] may set only "
                          + ", ".join(FACTORY_TRAIN_KEYS) + ", sent to every client each round")
    s["train"] = {k: train[k] for k in FACTORY_TRAIN_KEYS if k in train}
    if "device" in raw.get("runtime", {}):
        raise ConfigError("runtime.device", raw["runtime"]["device"], "not with model.factory "
                          "(the factory's trainer chooses its own device)")


# Built-in data sets: all have a central test set; these also give each client a local one.
LOCAL_TEST_DATASETS = ("heart_disease", "synthetic")


def evaluation_data(data: dict[str, Any]) -> tuple[bool, bool | None]:
    """What a ``[data]`` table offers evaluation: (a central test set?, local test splits on
    the clients?), the second None where only the data can tell (a ``custom`` loader may
    return its own test split)."""
    dataset = data["dataset"]
    if dataset == "files":
        return "test" in data, "test_fraction" in data
    if dataset == "custom":
        return "test_loader" in data, True if "test_fraction" in data else None
    return True, dataset in LOCAL_TEST_DATASETS


def evaluation_missing(data: dict[str, Any], what: str) -> str:
    """What to add to ``[data]`` for a ``central`` test set or ``federated`` local splits."""
    dataset = data["dataset"]
    if what == "central":
        key = "test_loader" if dataset == "custom" else "test"
        return (f"false: there is no central test set; add [data] {key} (the server's test "
                "set), or evaluate on the clients' local test splits (evaluation.federated)")
    if dataset in ("files", "custom"):
        extra = (" (or return a (train, test) pair from the loader)" if dataset == "custom"
                 else "")
        return ("false: the clients have no local test splits; add [data] test_fraction (each "
                f"client holds out that fraction of its data for evaluation){extra}")
    return (f"false: dataset '{dataset}' gives the clients no local test splits; use its "
            "central test set (evaluation.central), or dataset 'files' or 'custom' with [data] "
            "test_fraction")


def federated_by_default(privacy: dict[str, Any], central: bool, local: bool | None) -> bool:
    """Federated evaluation's default: on without a central test set when the clients may hold
    local test splits, unless the run is DP (refused there) or suppresses client metrics."""
    quiet = privacy["mode"] in ("central", "distributed") or \
        privacy.get("client_metrics") == "suppress"
    return not central and local is not False and not quiet


def _check_evaluation(s: dict[str, dict[str, Any]]) -> None:
    ev = s["evaluation"]
    if not ev:
        return
    if "fraction" in ev and "clients" in ev:
        raise ConfigError("evaluation.clients", ev["clients"],
                          "only one of evaluation.fraction and evaluation.clients")
    central, local = evaluation_data(s["data"])
    if ev.get("central") and not central:
        raise ConfigError("evaluation.central", True, evaluation_missing(s["data"], "central"))
    dp = s["privacy"]["mode"] in ("central", "distributed")
    if ev.get("federated") and dp:
        raise ConfigError("evaluation.federated", True,
                          f"false under {s['privacy']['mode']} DP: each client's evaluation "
                          "metrics and test sample count would reach the server without noise, "
                          "outside the DP accounting; evaluate on a central test set instead")
    if ev.get("federated") and local is False:
        raise ConfigError("evaluation.federated", True,
                          evaluation_missing(s["data"], "federated"))
    # Settings of a federated evaluation that will not run are a mistake, not a no-op.
    runs = ev.get("federated", federated_by_default(s["privacy"], central, local))
    for key in ("fraction", "clients", "min_clients"):
        if key in ev and not runs:
            raise ConfigError(f"evaluation.{key}", ev[key], "only with federated evaluation "
                              "(evaluation.federated = true)")


def _check_watermark(s: dict[str, dict[str, Any]]) -> None:
    w = s["watermark"]
    if not w:
        return
    if "key_file" not in w:
        raise ConfigError("watermark.key_file", "<missing>", "required with a [watermark] "
                          "table: a key file (create one with `fedmosaic watermark keygen`)")
    if not w.get("waffle", True) and not w.get("fingerprint", False):
        raise ConfigError("watermark.waffle", False, "true, or fingerprint = true")
    if "fingerprint_strength" in w and not w.get("fingerprint", False):
        raise ConfigError("watermark.fingerprint_strength", w["fingerprint_strength"],
                          "only with watermark.fingerprint = true")
    rt = s["runtime"]
    if w.get("fingerprint", False) and (rt["transport"] not in ("auto", "sequential")
                                        or rt["secure_aggregation"]):
        raise ConfigError("watermark.fingerprint", True, "only with runtime.transport = "
                          "'auto' or 'sequential' and no secure aggregation (the transport "
                          "that sends each client its own fingerprinted model; auto picks it)")


def _check_attack(s: dict[str, dict[str, Any]]) -> None:
    a = s["attack"]
    if not a:
        return
    for key in ("kind", "fraction"):
        if key not in a:
            allowed = "one of " + ", ".join(repr(k) for k in ATTACK_KEYS) if key == "kind" \
                else "a number in (0, 1)"
            raise ConfigError(f"attack.{key}", "<missing>", f"required with an [attack] table: "
                              f"{allowed}")
    kind = a["kind"]
    extra = set(a) - {"kind", "fraction", "seed"} - ATTACK_KEYS[kind]
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(f"attack.{key}", a[key], f"for attack '{kind}' only: "
                          + ", ".join(sorted(ATTACK_KEYS[kind])))
    if kind == "label_flip":
        if ("source" in a) != ("target" in a):
            key = "source" if "source" not in a else "target"
            raise ConfigError(f"attack.{key}", "<missing>",
                              "both attack.source and attack.target, or neither")
        if "source" in a and a["source"] == a["target"]:
            raise ConfigError("attack.target", a["target"], "a class other than attack.source")


def _check_clock(s: dict[str, dict[str, Any]], raw: dict[str, Any]) -> None:
    """``[clock]``: keys that need another, or that a trace file replaces; then defaults."""
    c = s["clock"]
    if "clock" not in raw:
        return
    if "trace" in c and "speed_sigma" in c:
        raise ConfigError("clock.speed_sigma", c["speed_sigma"], "not with clock.trace (the "
                          "trace gives each client's speed)")
    for key, needs in (("availability_period", "availability_fraction"),
                       ("availability_fraction", "availability_period")):
        if key in c and needs not in c:
            raise ConfigError(f"clock.{needs}", "<missing>", f"required with clock.{key}: "
                              + SCHEMA["clock"][needs].allowed)
    if "bandwidth_sigma" in c and "bandwidth_mbps" not in c:
        raise ConfigError("clock.bandwidth_sigma", c["bandwidth_sigma"], "only with "
                          "clock.bandwidth_mbps (the median bandwidth)")
    for key, value in CLOCK_DEFAULTS.items():
        if not (key == "speed_sigma" and "trace" in c):
            c.setdefault(key, value)
    if "bandwidth_mbps" in c:
        c.setdefault("bandwidth_sigma", 1.0)


def _check_robust(s: dict[str, dict[str, Any]]) -> None:
    r, a = s["robust"], s["anomaly"]
    if a and not a.get("enabled", False):
        extra = sorted(set(a) - {"enabled"})
        if extra:
            raise ConfigError(f"anomaly.{extra[0]}", a[extra[0]], "only with anomaly.enabled = "
                              "true")
    anomaly = bool(a.get("enabled", False))
    secure, mode = s["runtime"]["secure_aggregation"], s["privacy"]["mode"]
    if anomaly and (secure or mode == "central"):
        raise ConfigError("anomaly.enabled", True,
                          "false with secure aggregation (the server sees only sums) or central "
                          "DP (per-client scores and quarantine decisions are not covered by "
                          "the DP accounting)")
    if not r:
        return
    if "aggregator" not in r:
        raise ConfigError("robust.aggregator", "<missing>", "required with a [robust] table: one "
                          "of " + ", ".join(repr(k) for k in ROBUST_KEYS))
    rule = r["aggregator"]
    extra = set(r) - {"aggregator"} - ROBUST_KEYS[rule]
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(f"robust.{key}", r[key], f"for aggregator '{rule}' only: "
                          + ", ".join(sorted(ROBUST_KEYS[rule])))
    need = ROBUST_REQUIRED.get(rule)
    if need is not None and need not in r:
        raise ConfigError(f"robust.{need}", "<missing>", f"required for aggregator '{rule}': a "
                          "number > 0 (scale-dependent; about the norm of an honest update)")
    if rule == "fltrust":
        r.setdefault("root_samples", 100)
    if secure:
        raise ConfigError("robust.aggregator", rule,
                          "no robust aggregator with secure aggregation: the server only learns "
                          "the sum of the masked updates, and a robust rule needs each update")
    if mode == "central" and (rule != "norm_bound" or r.get("noise_std", 0)):
        raise ConfigError("robust.aggregator", rule,
                          "'norm_bound' without noise_std under central DP: the DP noise is "
                          "calibrated to one client moving the clipped sum by at most the clip; "
                          "rules that select, trim or reweight updates break that calibration")
    n = s["strategy"].get("clients_per_round")
    if n is not None and rule != "fltrust":
        from fedmosaic.robust import RobustPreconditionError, make_robust

        params = {k: v for k, v in r.items() if k != "aggregator"}
        try:
            make_robust(rule, **params).check(n)
        except (RobustPreconditionError, ValueError) as exc:
            raise ConfigError("robust.f", r.get("f", 0),
                              f"a value the cohort of strategy.clients_per_round = {n} "
                              f"allows ({exc})") from exc


def _check_privacy(s: dict[str, dict[str, Any]]) -> None:
    p = s["privacy"]
    mode = p["mode"]
    extra = set(p) - {"mode"} - PRIVACY_KEYS[mode]
    if extra:
        key = sorted(extra)[0]
        allowed = ", ".join(sorted(PRIVACY_KEYS[mode])) or "no other keys"
        raise ConfigError(f"privacy.{key}", p[key], f"for privacy mode '{mode}' only: {allowed}")
    if mode == "none":
        return
    if "clip" not in p:
        raise ConfigError("privacy.clip", "<missing>", "required: a number > 0")
    if mode == "local":
        mech = p.setdefault("mechanism", "gaussian")
        if mech not in ("gaussian", "laplace"):
            raise ConfigError("privacy.mechanism", mech, "'gaussian' or 'laplace' for local DP "
                              "('skellam' is a distributed mechanism)")
        need = "noise_multiplier" if mech == "gaussian" else "epsilon"
        if need not in p:
            raise ConfigError(f"privacy.{need}", "<missing>",
                              f"required for the {mech} mechanism: a number > 0")
        return
    if "delta" not in p:
        raise ConfigError("privacy.delta", "<missing>", "required: a number in (0, 1)")
    if p.get("insecure_seeded_noise") and p.get("secure_noise", False):
        raise ConfigError("privacy.insecure_seeded_noise", True,
                          "only with privacy.secure_noise = false (it allows seeded noise in a "
                          "deployment, for tests)")
    if p.get("accountant") == "pld":
        rdp_only = sorted({"accountant_conversion", "accountant_orders"} & set(p))
        if rdp_only:
            raise ConfigError(f"privacy.{rdp_only[0]}", p[rdp_only[0]],
                              "only with privacy.accountant = 'rdp' (PLD has no orders and "
                              "no RDP conversion)")
    if mode == "distributed":
        mech = p.get("mechanism", "gaussian")
        if mech not in ("gaussian", "skellam"):
            raise ConfigError("privacy.mechanism", mech, "'gaussian' or 'skellam' for "
                              "distributed DP")
        misplaced = sorted(SKELLAM_KEYS & set(p)) if mech != "skellam" else \
            sorted({"accountant", "accountant_conversion", "accountant_orders"} & set(p))
        if misplaced:
            raise ConfigError(f"privacy.{misplaced[0]}", p[misplaced[0]],
                              "only with privacy.mechanism = 'skellam'" if mech != "skellam"
                              else "not with the Skellam mechanism (it has its own RDP "
                              "accountant)")
        if "min_contributors" not in p:
            raise ConfigError("privacy.min_contributors", "<missing>",
                              "required: the fewest updates a released noised sum may have")
        if not s["runtime"]["secure_aggregation"]:
            raise ConfigError("privacy.mode", mode, "'distributed' only with "
                              "runtime.secure_aggregation = true (else the server sees each "
                              "update, noise shares and all)")
    elif s["runtime"]["secure_aggregation"]:
        raise ConfigError("privacy.mode", mode, "'none', 'local' or 'distributed' with secure "
                          "aggregation: central DP clips individual updates, which the server "
                          "never sees")
    if ("noise_multiplier" in p) == ("target_epsilon" in p):
        raise ConfigError("privacy.noise_multiplier", p.get("noise_multiplier", "<missing>"),
                          "exactly one of privacy.noise_multiplier and privacy.target_epsilon")
    strat = s["strategy"]
    # Asynchronous schedules have no DP sampling: _check_schedule refused its keys.
    sampling = (p.setdefault("sampling", "poisson") if strat.get("schedule", "sync") == "sync"
                else None)
    if sampling == "poisson" and "rate" not in p:
        raise ConfigError("privacy.rate", "<missing>",
                          "required with poisson sampling: the per-round inclusion probability")
    if sampling == "fixed" and "clients_per_round" not in strat:
        raise ConfigError("strategy.clients_per_round", "<missing>",
                          "required with fixed-size DP sampling")
    if sampling == "poisson" and ("clients_per_round" in strat or "fraction" in strat):
        key = "clients_per_round" if "clients_per_round" in strat else "fraction"
        raise ConfigError(f"strategy.{key}", strat[key],
                          "not with poisson DP sampling (privacy.rate sets the cohort)")
    if strat["name"] != "fedavg":
        raise ConfigError("strategy.name", strat["name"],
                          "'fedavg' under central or distributed DP (DP-FedAvg is the strategy)")
    if strat["weighting"] != "samples":
        raise ConfigError("strategy.weighting", strat["weighting"],
                          "the default under central or distributed DP (DP-FedAvg weights "
                          "every client equally by construction)")


# Beside a run directory's copy of the experiment file: the directory of the original, against
# which the copy's relative data paths and modules resolve (``fedmosaic resume``).
BASE_DIR_FILE = "experiment_dir.txt"


def record_base_dir(experiment: str | Path, run_dir: str | Path) -> Path:
    """Note in ``run_dir`` (which holds a copy of ``experiment``) where the original lives, so
    that ``load_experiment`` of the copy finds the data and modules the original names."""
    target = Path(run_dir) / BASE_DIR_FILE
    target.write_text(str(Path(experiment).resolve().parent) + "\n", encoding="utf-8")
    return target


# Beside a run directory's copy: the ``--trainer`` given to ``fedmosaic run`` (it replaces the
# copy's [model] table, so that ``fedmosaic resume`` trains the same model).
TRAINER_FILE = "trainer.txt"


def trainer_override(spec: str, cwd: str | Path | None = None) -> str:
    """A ``--trainer`` spec from the command line, made independent of the working directory:
    a module or file found there becomes an absolute file spec (the experiment's own modules
    resolve against its directory instead); an installed module stays as given."""
    target, sep, attr = spec.rpartition(":")
    if not sep:
        return spec  # validation names the problem
    here = Path(cwd) if cwd is not None else Path.cwd()
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        return f"{(path if path.is_absolute() else here / path).resolve()}:{attr}"
    top = target.split(".")[0]
    if (here / f"{top}.py").is_file() and "." not in target:
        return f"{(here / f'{top}.py').resolve()}:{attr}"
    return spec


def record_trainer(run_dir: str | Path, spec: str) -> Path:
    """Note in ``run_dir`` the ``--trainer`` its run used (see ``TRAINER_FILE``)."""
    target = Path(run_dir) / TRAINER_FILE
    target.write_text(spec + "\n", encoding="utf-8")
    return target


def load_experiment(path: str | Path, base_dir: str | Path | None = None,
                    trainer: str | None = None) -> Experiment:
    """Read and validate an experiment TOML file. ``base_dir``: where its relative data paths
    and modules are found, when not beside it; by default the directory recorded by
    ``record_base_dir`` beside it (a run directory's copy), else the file's own directory.
    ``trainer`` (``--trainer``; by default one recorded by ``record_trainer`` beside a run
    directory's copy) replaces the [model] table with ``factory = trainer``."""
    path = Path(path)
    recorded = path.parent / BASE_DIR_FILE
    if base_dir is None and recorded.is_file():
        base_dir = recorded.read_text(encoding="utf-8").strip() or None
    recorded_trainer = path.parent / TRAINER_FILE
    if trainer is None and recorded_trainer.is_file():
        trainer = recorded_trainer.read_text(encoding="utf-8").strip() or None
    if not path.is_file():
        raise ConfigError("<file>", str(path), "an existing experiment .toml file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError("<file>", str(path), f"valid TOML ({exc})") from exc
    if trainer is not None:
        raw["model"] = {"factory": trainer}
    exp = validate(raw, source=path)
    exp.base_dir = Path(base_dir) if base_dir is not None else None
    return exp
