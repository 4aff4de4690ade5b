"""Privacy audits a user runs on their own model and data.

``leakage_audit`` mounts the gradient-inversion attacks DLG (Zhu et al. 2019), iDLG (Zhao
et al. 2020) and, for a fully connected first layer, the analytic inversion (Phong et al.
2017; Geiping et al. 2020, Sec. 3) against a client's update, as an honest-but-curious
server would, with no defence and with each defence (local DP noise, top-k pruning, secure
aggregation), and reports how well the client's inputs and labels are reconstructed.
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
    "Reconstruction",
    "SecureAggregation",
    "TopK",
    "UpdateModel",
    "analytic_inversion",
    "expand_defences",
    "idlg_label",
    "invert",
    "leakage_audit",
]
