"""Weight decompositions from calibration data: CorDA (covariance-oriented SVD), ASVD, plain SVD.

``attach_corda_eigens`` is the batched, cached replacement for peft's ``preprocess_corda``;
``study`` runs the paper's full-decompose perplexity study (Fig. 2 / Table 6).
"""

from loralab.decomposition.attach import attach_corda_eigens, corda_targets
from loralab.decomposition.corda import DEFAULTS as CORDA_DEFAULTS
from loralab.decomposition.corda import damped_inverse, decompose_weight

__all__ = ["attach_corda_eigens", "corda_targets", "CORDA_DEFAULTS", "damped_inverse", "decompose_weight"]
