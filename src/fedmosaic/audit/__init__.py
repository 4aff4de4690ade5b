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
