"""The leakage report: per (defence, attack) reconstruction quality, the verdict and the
recommended DP noise, as JSON-able data and as Markdown."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Significance level of the one-sided binomial test that labels beat chance.
LABEL_ALPHA = 0.05

CRITERION = (
    "an attack fails when no audited sample is reconstructed closer (MSE) than the data set's "
    "mean input is to it -- the best guess an attacker makes without the update -- and its "
    f"label accuracy is not above chance (one-sided binomial test, p >= {LABEL_ALPHA})"
)


@dataclass
class AttackResult:
    """One attack against one defence, over every audited sample."""

    defence: str
    defence_kind: str
    defence_params: dict[str, Any]
    attack: str
    samples: int
    mse: float
    psnr: float
    best_psnr: float
    label_accuracy: float
    label_samples: int
    label_p_value: float
    leaked_samples: int
    matching_loss: float

    @property
    def failed(self) -> bool:
        """True when the attack learned nothing beyond the prior (see ``CRITERION``)."""
        return self.leaked_samples == 0 and self.label_p_value >= LABEL_ALPHA

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}


@dataclass
class LeakageReport:
    """Everything ``leakage_audit`` measured; ``to_dict``/``save`` for JSON, ``to_markdown``."""

    model: dict[str, Any]
    data: dict[str, Any]
    settings: dict[str, Any]
    prior: dict[str, float]
    results: list[AttackResult]
    recommendation: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "settings": self.settings,
                "prior": self.prior, "criterion": CRITERION,
                "results": [r.to_dict() for r in self.results],
                "recommendation": self.recommendation, "notes": self.notes}

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``report.json`` and ``report.md`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / "report.json", out / "report.md"
        js.write_text(json.dumps(self.to_dict(), indent=1))
        md.write_text(self.to_markdown())
        return js, md

    def to_markdown(self) -> str:
        d, s = self.data, self.settings
        rec = self.recommendation
        lines = [
            "# Gradient-leakage audit",
            "",
            f"Model: {self.model['name']} ({self.model['parameters']:,} parameters). "
            f"Data: {d['name']}, {s['samples']} samples audited of {d['size']}, features "
            f"{tuple(d['feature_shape'])}, {d['num_classes']} classes.",
            "",
            f"Attacker: the server, holding the global weights ({s['weights']}) and each "
            f"client's update after {s['local_steps']} full-batch SGD step(s) at lr "
            f"{s['lr']:g} on {s['batch_size']} sample(s); "
            + (f"L-BFGS (DLG, iDLG), {s['iterations']} iterations, {s['restarts']} restart(s)"
               if set(s.get("attacks", ["dlg"])) - {"analytic"} else "the analytic attack only (no "
               "optimisation)") + f", seed {s['seed']}.",
            "",
            f"Reconstructions are clipped to the data range [{d['min']:g}, {d['max']:g}]; PSNR "
            f"uses the range {d['data_range']:g}. Baseline (the data set's mean input as the "
            f"guess): MSE {self.prior['mse']:.4f}, PSNR {self.prior['psnr']:.2f} dB; chance "
            f"label accuracy {self.prior['chance_accuracy']:.3f}.",
            "",
            "| defence | attack | samples | MSE | PSNR (dB) | best PSNR (dB) | label acc. "
            "(samples) | leaked samples | verdict |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in self.results:
            verdict = "fails" if r.failed else "**leaks**"
            lines.append(f"| {r.defence} | {r.attack} | {r.samples} | {r.mse:.4f} | "
                         f"{r.psnr:.2f} | {r.best_psnr:.2f} | {r.label_accuracy:.3f} "
                         f"({r.label_samples}) | "
                         f"{r.leaked_samples} | {verdict} |")
        lines += ["", f"Criterion: {CRITERION}.", "", "Recommendation: " + rec["text"]]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _smallest_safe(by_z: dict[float, list[AttackResult]],
                   ok: Callable[[AttackResult], bool]) -> float | None:
    """The smallest z at which ``ok`` holds for every attack."""
    return next((z for z in sorted(by_z) if all(ok(r) for r in by_z[z])), None)


def recommend_noise(results: list[AttackResult]) -> dict[str, Any]:
    """The smallest tested DP noise multiplier at which every attack fails, and the (often
    smaller) one at which no input is reconstructed better than the baseline guess."""
    by_z: dict[float, list[AttackResult]] = {}
    for r in results:
        if r.defence_kind == "dp":
            by_z.setdefault(float(r.defence_params["noise_multiplier"]), []).append(r)
    if not by_z:
        return {"noise_multiplier": None, "inputs_noise_multiplier": None, "tested": [],
                "text": "no DP noise was tested (add the 'dp' defence)."}
    tested = sorted(by_z)
    chosen = _smallest_safe(by_z, lambda r: r.failed)
    inputs = _smallest_safe(by_z, lambda r: r.leaked_samples == 0)
    listed = ", ".join(f"{z:g}" for z in tested)
    if chosen is None:
        text = f"no tested noise multiplier ({listed}) stops every attack; test larger ones."
    else:
        clip = by_z[chosen][0].defence_params["clip"]
        text = (f"noise multiplier z = {chosen:g} (per-coordinate noise std z x clip, clip = "
                f"{clip}): the smallest tested value ({listed}) at which every attack "
                "fails.")
    if inputs is not None and inputs != chosen:
        text += (f" Inputs alone stop being reconstructed at z = {inputs:g}; the labels "
                 "need more noise.")
    text += (" This is an empirical threshold for these attacks on this model and data, not "
             "a differential-privacy guarantee.")
    return {"noise_multiplier": chosen, "inputs_noise_multiplier": inputs, "tested": tested,
            "text": text}
