"""A client's own privacy policy, and its own ledger of what it has released under local DP.

In a deployment the server decides each round's task: whether the update goes through secure
aggregation, which DP stage the client applies and with how much noise. A server that is
compromised, misconfigured or simply curious could ask for less (no ``secagg`` field: a
plaintext upload; a tiny noise multiplier; a huge clip). The client's policy is read from a
TOML file the data holder controls (``fedmosaic client --policy policy.toml``) and checked
against every task *before* the model is downloaded; a task that violates it is refused with
a reason the server records (``RefuseTask``), never silently downgraded.

What is checked (``PrivacyPolicy.check``), with ``z`` the noise standard deviation of a
stage divided by its clip, i.e. the noise multiplier on what the server sees:

* ``[secagg] mode = "secagg+"``: the task must carry SecAgg+ settings, with at least
  ``min_bits`` ring bits when set. ``min_population``/``max_population``/
  ``corrupted_fraction``/``dropout_fraction``/``security_bits`` are the bounds from which the
  SecAgg+ client derives the weakest threshold and degree it accepts (Bell et al. 2020); they
  travel to it as a ``fedmosaic.privacy.secagg.SecAggBounds`` (fields ``min_clients``,
  ``max_clients``, ``corrupted_fraction``, ``dropout_rate``, ``security_bits``), which checks
  each round's setup message -- after training, so a setup it refuses is a withdrawal from
  the secure sum, not a ``RefuseTask``.
* Local DP, Gaussian: ``z = noise_multiplier``. Distributed noise share: ``z = noise_std *
  sqrt(m) / clip``, where ``m`` is ``[dp] assumed_contributors`` under secure aggregation
  (the number of honest shares the data holder counts on being in every sum the server can
  obtain) and 1 without it (the server sees this client's update alone). Each stage must
  have ``z >= min_noise_multiplier`` and ``clip <= max_clip``. A Laplace local-DP stage
  (pure epsilon-DP, L1 clip) is accepted under ``min_noise_multiplier`` only if its
  per-round epsilon is at most that of the weakest Gaussian stage the policy accepts
  (``z = min_noise_multiplier``, at ``[dp] delta``).
* Distributed Skellam (SecAgg+ settings carrying the mechanism): each client adds
  ``Sk(mu / m)``; ``z = sqrt(assumed_contributors * mu / m) / (gamma * clip)`` (the noise
  multiplier as ``DistributedSkellam`` defines it, over the shares the data holder counts
  on) must be ``>= min_noise_multiplier`` and ``clip <= max_clip``; it counts as DP noise.
* With ``min_noise_multiplier`` set, a task with no DP stage at all is refused. Central DP
  (noise the server adds) is not counted: the policy protects against the server.
* ``max_epsilon_per_round``: one round's local-DP epsilon at ``delta``.
* ``epsilon_budget``: the client's ledger (``PrivacyLedger``) composes every local-DP
  release it has made, over runs and restarts, with the RDP accountant of
  ``fedmosaic.privacy.accountant``; a task whose release would take the total past the
  budget is refused. What is charged is what the server can see of this client's update
  on its own: a local-DP stage always (even under SecAgg+: a malicious server can try to
  isolate one client), a distributed noise share only without secure aggregation (it is
  then local DP with ``z = noise_std / clip``). An upload the server would see in plaintext
  with no noise has no finite epsilon and is refused when a budget is set; a SecAgg+ task
  without local noise is not charged to this budget (the sum's distributed DP is the
  server's accountant's business).

Epsilon of one Gaussian local-DP report: two clipped updates are up to ``2 * clip`` apart,
so noise ``z * clip`` is a Gaussian mechanism with multiplier ``z / 2`` (as
``LocalDP.guarantee``); a Laplace report with parameter ``epsilon`` is ``epsilon``-DP. RDP
composition (Mironov 2017, "Renyi Differential Privacy"), converted to (epsilon, delta) by
dp-accounting.

A client without a policy behaves as before (accepts every task) and ``fedmosaic client``
warns that it has none.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmosaic.algorithms.strategy import ClientStage
from fedmosaic.core.errors import ConfigError, FedmosaicError
from fedmosaic.privacy.accountant import PrivacyAccountant
from fedmosaic.privacy.local_dp import DistributedNoiseShare, LocalDP

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

log = logging.getLogger(__name__)

SECAGG_MODES = ("none", "secagg+")
LEDGER_FORMAT = "fedmosaic-privacy-ledger"
LEDGER_VERSION = 1
LEDGER_SUFFIX = ".privacy-ledger.json"
MAX_LEDGER_RELEASES = 1000  # the release log kept for people; the accountant keeps them all

_SCHEMA: dict[str, tuple[str, ...]] = {
    "secagg": ("mode", "min_bits", "min_population", "max_population", "corrupted_fraction",
               "dropout_fraction", "security_bits", "every_graph"),
    "dp": ("min_noise_multiplier", "max_clip", "max_epsilon_per_round", "epsilon_budget",
           "delta", "assumed_contributors"),
}
_TOP_LEVEL = ("ledger",)
# Policy key -> SecAggBounds field (the policy file speaks of the population, as the issue).
_BOUNDS = {"min_population": "min_clients", "max_population": "max_clients",
           "corrupted_fraction": "corrupted_fraction", "dropout_fraction": "dropout_rate",
           "security_bits": "security_bits", "every_graph": "every_graph"}


class PolicyError(FedmosaicError, ValueError):
    """A privacy policy file (or ledger) cannot be used; the message names the file and key."""


class PolicyViolation(FedmosaicError):
    """A task violates this client's policy; ``code`` is one of ``wire.REFUSAL_CODES``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass(frozen=True)
class SecAggPolicy:
    """``[secagg]``: whether secure aggregation is required, and its minimum strength."""

    mode: str = "none"
    min_bits: int | None = None
    min_population: int | None = None
    max_population: int | None = None
    corrupted_fraction: float | None = None
    dropout_fraction: float | None = None
    security_bits: float | None = None
    # Accept only setups secure for every possible neighbour graph (closes graph grinding).
    every_graph: bool | None = None

    @property
    def required(self) -> bool:
        return self.mode == "secagg+"

    def bounds(self) -> Any:
        """The ``fedmosaic.privacy.secagg.SecAggBounds`` the SecAgg+ client checks each setup
        against (its defaults for the keys not set), or None when no key is set.
        ``ValueError`` if it refuses the values."""
        values = {name: getattr(self, key) for key, name in _BOUNDS.items()}
        if all(v is None for v in values.values()):
            return None
        from fedmosaic.privacy.secagg import SecAggBounds

        return SecAggBounds(**{k: v for k, v in values.items() if v is not None})


@dataclass(frozen=True)
class DPPolicy:
    """``[dp]``: the least noise and the largest clip accepted, and the epsilon budget."""

    min_noise_multiplier: float | None = None
    max_clip: float | None = None
    max_epsilon_per_round: float | None = None
    epsilon_budget: float | None = None
    delta: float = 1e-5
    assumed_contributors: int = 1


@dataclass(frozen=True)
class Release:
    """One DP event of a report, as the accountant records it: ``("gaussian", z / 2)`` or
    ``("laplace", 1 / epsilon)`` (scale over L1 sensitivity)."""

    mechanism: str
    noise: float

    def record(self, accountant: PrivacyAccountant) -> None:
        if self.mechanism == "gaussian":
            accountant.record_gaussian_round(self.noise, "none")
        else:
            accountant.record_laplace(self.noise)


@dataclass(frozen=True)
class Acceptance:
    """A task the policy accepts: the releases to charge to the ledger before uploading, and
    the ledger's epsilon afterwards (None when nothing is charged)."""

    releases: tuple[Release, ...] = ()
    epsilon_after: float | None = None


@dataclass(frozen=True)
class PrivacyPolicy:
    """A client's privacy policy (see the module docstring for what each key means)."""

    secagg: SecAggPolicy = field(default_factory=SecAggPolicy)
    dp: DPPolicy = field(default_factory=DPPolicy)
    ledger: Path | None = None  # default: next to the client's key (``default_ledger_path``)
    source: str = "<policy>"

    # -- loading ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> PrivacyPolicy:
        """The policy in TOML file ``path``; ``PolicyError`` naming the key if it is wrong."""
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"privacy policy {path}: {exc}") from exc
        try:
            return cls.from_dict(raw, base=path.parent, source=str(path))
        except ConfigError as exc:
            raise PolicyError(f"privacy policy {path}: {exc}") from exc

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, base: Path | None = None,
                  source: str = "<policy>") -> PrivacyPolicy:
        """The policy in a parsed TOML document; ``ConfigError`` naming the key if wrong."""
        for key, value in raw.items():
            if key in _SCHEMA:
                if not isinstance(value, dict):
                    raise ConfigError(key, value, "a table")
                for sub in value:
                    if sub not in _SCHEMA[key]:
                        raise ConfigError(f"{key}.{sub}", value[sub],
                                          "one of the keys " + ", ".join(_SCHEMA[key]))
            elif key not in _TOP_LEVEL:
                raise ConfigError(key, value, "the tables [secagg] and [dp], and 'ledger'")
        s, d = raw.get("secagg", {}), raw.get("dp", {})
        mode = s.get("mode", "none")
        if mode not in SECAGG_MODES:
            raise ConfigError("secagg.mode", mode, SECAGG_MODES)
        secagg = SecAggPolicy(
            mode=mode,
            min_bits=_int(s, "secagg", "min_bits", 2, 64),
            min_population=_int(s, "secagg", "min_population", 2, None),
            max_population=_int(s, "secagg", "max_population", 2, None),
            corrupted_fraction=_fraction(s, "secagg", "corrupted_fraction"),
            dropout_fraction=_fraction(s, "secagg", "dropout_fraction"),
            security_bits=_positive(s, "secagg", "security_bits"),
            every_graph=_flag(s, "secagg", "every_graph"))
        if secagg.min_population is not None and secagg.max_population is not None \
                and secagg.max_population < secagg.min_population:
            raise ConfigError("secagg.max_population", secagg.max_population,
                              f"an integer >= secagg.min_population ({secagg.min_population})")
        delta = _positive(d, "dp", "delta")
        if delta is not None and delta >= 1:
            raise ConfigError("dp.delta", delta, "a number in (0, 1)")
        dp = DPPolicy(
            min_noise_multiplier=_positive(d, "dp", "min_noise_multiplier"),
            max_clip=_positive(d, "dp", "max_clip"),
            max_epsilon_per_round=_positive(d, "dp", "max_epsilon_per_round"),
            epsilon_budget=_positive(d, "dp", "epsilon_budget"),
            delta=1e-5 if delta is None else delta,
            assumed_contributors=_int(d, "dp", "assumed_contributors", 1, None) or 1)
        ledger = raw.get("ledger")
        if ledger is not None:
            if not isinstance(ledger, str) or not ledger.strip():
                raise ConfigError("ledger", ledger, "a file path (relative to the policy file)")
            ledger_path = Path(ledger).expanduser()
            if not ledger_path.is_absolute() and base is not None:
                ledger_path = base / ledger_path
        policy = cls(secagg=secagg, dp=dp, ledger=ledger_path if ledger is not None else None,
                     source=source)
        try:  # the SecAgg+ client's own checks of the bounds, when it has them
            policy.secagg.bounds()
        except ValueError as exc:
            raise ConfigError("secagg", {k: v for k, v in s.items() if k != "mode"},
                              f"bounds the SecAgg+ client accepts ({exc})") from exc
        return policy

    def describe(self) -> str:
        """One line for the client's log."""
        parts = [f"secure aggregation {'required' if self.secagg.required else 'optional'}"]
        for name, value in dataclasses.asdict(self.secagg).items():
            if name != "mode" and value is not None:
                parts.append(f"secagg.{name}={value:g}")
        for name, value in dataclasses.asdict(self.dp).items():
            if value is not None:
                parts.append(f"dp.{name}={value:g}")
        return ", ".join(parts)

    # -- checking a task ------------------------------------------------------------------
    def check(self, stages: Sequence[ClientStage], secagg_bits: int | None,
              ledger: PrivacyLedger | None = None, *, skellam: Any = None) -> Acceptance:
        """Whether a task with client ``stages`` and (if ``secagg_bits`` is not None) SecAgg+
        with that many ring bits is acceptable; raises ``PolicyViolation`` if not. ``ledger``
        is needed for an epsilon budget. ``skellam`` is the task's distributed Skellam
        mechanism (a ``fedmosaic.privacy.skellam.SkellamMechanism``, only under SecAgg+), if
        any: it counts as this client's noise (see ``_check_skellam``)."""
        secure = secagg_bits is not None
        if skellam is not None and not secure:
            raise PolicyViolation("malformed_task",
                                  "Skellam encoding without secure aggregation")
        if self.secagg.required and not secure:
            raise PolicyViolation(
                "secagg_required", "this client's privacy policy requires secure aggregation "
                "(SecAgg+); the task asks for a plaintext upload")
        if secure and self.secagg.min_bits is not None and secagg_bits < self.secagg.min_bits:
            raise PolicyViolation(
                "secagg_bits", f"SecAgg+ with {secagg_bits} ring bits; this client's policy "
                f"requires at least {self.secagg.min_bits}")
        dp = self.dp
        releases: list[Release] = []
        noised = False
        for stage in stages:
            releases.extend(self._check_stage(stage, secure))
            noised = noised or isinstance(stage, LocalDP | DistributedNoiseShare)
        if skellam is not None:
            self._check_skellam(skellam)
            noised = True
        if dp.min_noise_multiplier is not None and not noised:
            raise PolicyViolation(
                "no_dp", "the task carries no DP stage; this client's privacy policy requires "
                f"noise with multiplier >= {dp.min_noise_multiplier:g}")
        if dp.max_epsilon_per_round is not None and releases:
            eps = _epsilon(releases, dp.delta)
            if eps > dp.max_epsilon_per_round:
                raise PolicyViolation(
                    "epsilon_per_round", f"one round's release is ({eps:.4g}, {dp.delta:g})-DP; "
                    f"this client's policy allows at most epsilon {dp.max_epsilon_per_round:g}")
        if dp.epsilon_budget is None:
            after = ledger.epsilon_with(releases) if ledger is not None and releases else None
            return Acceptance(tuple(releases), after)
        if not secure and not releases:
            raise PolicyViolation(
                "epsilon_budget", "a plaintext upload without local noise has no finite epsilon;"
                f" this client's epsilon budget is {dp.epsilon_budget:g}")
        if not releases:
            return Acceptance()
        if ledger is None:
            raise ValueError("an epsilon budget needs the client's PrivacyLedger")
        spent, after = ledger.epsilon(), ledger.epsilon_with(releases)
        if after > dp.epsilon_budget:
            raise PolicyViolation(
                "epsilon_budget", f"this client has released epsilon {spent:.4g} at delta "
                f"{dp.delta:g} under local DP; this round would take it to {after:.4g}, over "
                f"its budget of {dp.epsilon_budget:g}")
        return Acceptance(tuple(releases), after)

    def _check_stage(self, stage: ClientStage, secure: bool) -> list[Release]:
        """Check one stage against [dp]; the releases it makes visible to the server."""
        dp = self.dp
        if isinstance(stage, LocalDP):
            self._check_clip("local DP", stage.clip)
            if stage.mechanism == "laplace":
                assert stage.epsilon is not None
                if dp.min_noise_multiplier is not None:
                    floor = _epsilon([Release("gaussian", dp.min_noise_multiplier / 2)],
                                     dp.delta)
                    if stage.epsilon > floor:
                        raise PolicyViolation(
                            "noise_multiplier", f"local DP Laplace with epsilon "
                            f"{stage.epsilon:g} per round is weaker than Gaussian noise with "
                            f"multiplier {dp.min_noise_multiplier:g} (epsilon {floor:.4g} at "
                            f"delta {dp.delta:g}), this client's minimum")
                return [Release("laplace", 1.0 / stage.epsilon)]
            assert stage.noise_multiplier is not None
            self._check_noise("local DP", stage.noise_multiplier)
            return [Release("gaussian", stage.noise_multiplier / 2)]
        if isinstance(stage, DistributedNoiseShare):
            self._check_clip("distributed DP", stage.clip)
            contributors = dp.assumed_contributors if secure else 1
            z = stage.noise_std * math.sqrt(contributors) / stage.clip
            where = (f"over {contributors} assumed contributors" if secure
                     else "alone: the task has no secure aggregation")
            self._check_noise(f"distributed DP ({where})", z)
            return [] if secure else [Release("gaussian", stage.noise_std / stage.clip / 2)]
        # wire.stage_from_wire builds only the two stages above.
        raise PolicyViolation("malformed_task", f"unknown client stage {type(stage).__name__}")

    def _check_skellam(self, mechanism: Any) -> None:
        """The distributed Skellam mechanism's noise, as its noise multiplier is defined
        (``DistributedSkellam``: ``mu = (gamma z c)^2``): this client adds ``Sk(mu / m)``
        integer noise, ``m`` the server's ``min_contributors``; the client counts on
        ``[dp] assumed_contributors`` honest shares in any sum the server can unmask, so the
        noise it relies on has variance ``assumed * mu / m`` in integer units, i.e. standard
        deviation ``sqrt(assumed * mu / m) / gamma`` in float units, and
        ``z = sqrt(assumed * mu / m) / (gamma * clip)``. A server that raises ``m`` to shrink
        each share lowers this ``z``."""
        self._check_clip("distributed Skellam", mechanism.clip)
        assumed = self.dp.assumed_contributors
        z = math.sqrt(assumed * mechanism.share_mu) / (mechanism.gamma * mechanism.clip)
        self._check_noise(f"distributed Skellam (over {assumed} assumed contributors)", z)

    def _check_clip(self, what: str, clip: float) -> None:
        if self.dp.max_clip is not None and clip > self.dp.max_clip:
            raise PolicyViolation("clip", f"{what} clip {clip:g} is above this client's "
                                          f"maximum of {self.dp.max_clip:g}")

    def _check_noise(self, what: str, z: float) -> None:
        floor = self.dp.min_noise_multiplier
        if floor is not None and z < floor:
            raise PolicyViolation("noise_multiplier", f"{what} noise multiplier {z:.4g} is "
                                                      f"below this client's minimum of {floor:g}")


def _epsilon(releases: Sequence[Release], delta: float) -> float:
    acc = PrivacyAccountant("rdp", "add_remove")
    for r in releases:
        r.record(acc)
    return acc.epsilon(delta)


def _number(table: dict[str, Any], section: str, key: str) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value):
        raise ConfigError(f"{section}.{key}", value, "a finite number")
    return float(value)


def _positive(table: dict[str, Any], section: str, key: str) -> float | None:
    value = _number(table, section, key)
    if value is not None and value <= 0:
        raise ConfigError(f"{section}.{key}", table[key], "a finite number > 0")
    return value


def _flag(table: dict[str, Any], section: str, key: str) -> bool | None:
    value = table.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{section}.{key}", value, "true or false")
    return value


def _fraction(table: dict[str, Any], section: str, key: str) -> float | None:
    value = _number(table, section, key)
    if value is not None and not 0 <= value < 1:
        raise ConfigError(f"{section}.{key}", table[key], "a fraction in [0, 1)")
    return value


def _int(table: dict[str, Any], section: str, key: str, lo: int, hi: int | None) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < lo \
            or (hi is not None and value > hi):
        allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
        raise ConfigError(f"{section}.{key}", value, allowed)
    return value


# -- the ledger -----------------------------------------------------------------------------

def default_ledger_path(key: str | Path) -> Path:
    """Where a client keeps its ledger by default: next to its private key
    (``clients/ID.key`` -> ``clients/ID.privacy-ledger.json``)."""
    key = Path(key)
    return key.with_name(key.stem + LEDGER_SUFFIX)


class PrivacyLedger:
    """The client's own accountant of its local-DP releases, persisted in ``path``.

    Every release is recorded and written to disk (atomically: a temporary file, fsync,
    rename) *before* the update leaves the process, so a crash or restart can only
    over-count, never forget a release. The file is JSON: the accountant's ``state_dict``
    (``fedmosaic.privacy.accountant``) plus a log of the last ``MAX_LEDGER_RELEASES``
    releases (time, experiment, round, epsilon afterwards). An unreadable ledger is an error,
    not a fresh start: the budget already spent would be unknown. A lock (``flock`` on
    ``path + ".lock"``) keeps two client processes from spending one budget twice.
    """

    def __init__(self, path: str | Path, delta: float = 1e-5) -> None:
        self.path, self.delta = Path(path), float(delta)
        self._lock_file: Any = None
        self._lock()
        try:
            self.accountant, self.releases = self._read()
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise PolicyError(f"privacy ledger {self.path}: {exc}") from exc
        self._lock_file = os.fdopen(fd, "r+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._lock_file.close()
            self._lock_file = None
            raise PolicyError(f"privacy ledger {self.path} is in use by another process "
                              "(one client process per ledger, so no budget is spent twice)"
                              ) from exc

    def _read(self) -> tuple[PrivacyAccountant, list[dict[str, Any]]]:
        if not self.path.exists():
            return PrivacyAccountant("rdp", "add_remove"), []
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT \
                    or data.get("version") != LEDGER_VERSION:
                raise ValueError(f"not a {LEDGER_FORMAT} version {LEDGER_VERSION} file")
            accountant = PrivacyAccountant.from_state_dict(data["accountant"])
            if (accountant.accountant, accountant.neighboring) != ("rdp", "add_remove"):
                raise ValueError("the ledger's accountant must be rdp/add_remove")
            releases = data.get("releases", [])
            if not isinstance(releases, list):
                raise ValueError("'releases' must be a list")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PolicyError(
                f"privacy ledger {self.path} is unreadable ({exc}); the epsilon already spent "
                "is unknown, so this client will not start. Restore the file, or move it away "
                "to reset the budget deliberately") from exc
        return accountant, releases

    def epsilon(self) -> float:
        """Epsilon spent so far at this ledger's delta."""
        return self.accountant.epsilon(self.delta)

    def epsilon_with(self, releases: Sequence[Release]) -> float:
        """Epsilon spent if ``releases`` were added."""
        acc = self.accountant.copy()
        for r in releases:
            r.record(acc)
        return acc.epsilon(self.delta)

    def charge(self, releases: Sequence[Release], *, budget: float | None, round_num: int,
               experiment: str) -> float:
        """Record ``releases`` and persist them; returns epsilon afterwards. Raises
        ``PolicyViolation`` (nothing recorded) if that would exceed ``budget``."""
        after = self.epsilon_with(releases)
        if budget is not None and after > budget:
            raise PolicyViolation("epsilon_budget", f"this round would take the epsilon spent "
                                                    f"to {after:.4g}, over the budget {budget:g}")
        accountant = self.accountant.copy()
        for r in releases:
            r.record(accountant)
        entry = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "experiment": experiment, "round": round_num,
                 "releases": [dataclasses.asdict(r) for r in releases],
                 "epsilon_after": after, "delta": self.delta}
        log_entries = [*self.releases, entry][-MAX_LEDGER_RELEASES:]
        self._write(accountant, log_entries)
        self.accountant, self.releases = accountant, log_entries
        return after

    def _write(self, accountant: PrivacyAccountant, releases: list[dict[str, Any]]) -> None:
        blob = json.dumps({"format": LEDGER_FORMAT, "version": LEDGER_VERSION,
                           "accountant": accountant.state_dict(), "releases": releases},
                          indent=1).encode()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name + ".")
        try:
            with os.fdopen(fd, "wb") as f:  # mkstemp creates it 0600
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        with contextlib.suppress(OSError):  # the rename itself survives a power cut
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def close(self) -> None:
        """Release the lock (the ledger file stays)."""
        if self._lock_file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()
            self._lock_file = None

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
