"""Privacy audits a user runs on their own model and data.

``leakage_audit`` mounts the gradient-inversion attacks DLG (Zhu et al. 2019), iDLG (Zhao
et al. 2020) and, for a fully connected first layer, the analytic inversion (Phong et al.
2017; Geiping et al. 2020, Sec. 3) against a client's update, as an honest-but-curious
server would, with no defence and with each defence (local DP noise, top-k pruning, secure
aggregation), and reports how well the client's inputs and labels are reconstructed.

``audit_privacy`` (``fedmosaic.audit.privacy_audit``) measures a DP run from outside: canary
clients go through the real strategy, and the run's epsilon gets an empirical lower bound
(Steinke, Nasr and Jagielski 2023) and an estimate (Andrew et al. 2024) next to the
accountant's figure.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmosaic.audit.attacks import Reconstruction, analytic_inversion, idlg_label, invert
    from fedmosaic.audit.defences import (
        DEFENCE_NAMES,
        GaussianNoise,
        NoDefence,
        SecureAggregation,
        TopK,
        expand_defences,
    )
    from fedmosaic.audit.errors import AuditError
    from fedmosaic.audit.leakage import ATTACKS, leakage_audit
    from fedmosaic.audit.privacy_audit import PrivacyAuditReport, audit_privacy
    from fedmosaic.audit.report import CRITERION, AttackResult, LeakageReport
    from fedmosaic.audit.target import UpdateModel

# The audits import torch and scipy; ``fedmosaic --help`` registers the ``audit`` commands
# and must not pay for them, so names load on first use (PEP 562).
_EXPORTS = {
    "ATTACKS": "fedmosaic.audit.leakage",
    "AttackResult": "fedmosaic.audit.report",
    "AuditError": "fedmosaic.audit.errors",
    "CRITERION": "fedmosaic.audit.report",
    "DEFENCE_NAMES": "fedmosaic.audit.defences",
    "GaussianNoise": "fedmosaic.audit.defences",
    "LeakageReport": "fedmosaic.audit.report",
    "NoDefence": "fedmosaic.audit.defences",
    "PrivacyAuditReport": "fedmosaic.audit.privacy_audit",
    "Reconstruction": "fedmosaic.audit.attacks",
    "SecureAggregation": "fedmosaic.audit.defences",
    "TopK": "fedmosaic.audit.defences",
    "UpdateModel": "fedmosaic.audit.target",
    "analytic_inversion": "fedmosaic.audit.attacks",
    "audit_privacy": "fedmosaic.audit.privacy_audit",
    "expand_defences": "fedmosaic.audit.defences",
    "idlg_label": "fedmosaic.audit.attacks",
    "invert": "fedmosaic.audit.attacks",
    "leakage_audit": "fedmosaic.audit.leakage",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedmosaic.audit' has no attribute {name!r}")
    return getattr(import_module(module), name)


__all__ = [
    "ATTACKS",
    "CRITERION",
    "DEFENCE_NAMES",
    "AttackResult",
    "AuditError",
    "GaussianNoise",
    "LeakageReport",
    "NoDefence",
    "PrivacyAuditReport",
    "Reconstruction",
    "SecureAggregation",
    "TopK",
    "UpdateModel",
    "analytic_inversion",
    "audit_privacy",
    "expand_defences",
    "idlg_label",
    "invert",
    "leakage_audit",
]
