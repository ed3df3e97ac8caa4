"""fusedloss: fused softmax cross-entropy (with the LM head fused in, too), focal, InfoNCE,
distillation and SigLIP losses, and token log-probs with entropy, for PyTorch."""
from ._backends import available_backends, warn_if_extension_missing
from ._library import reusable_graph
from .cross_entropy import CrossEntropyLoss, cross_entropy
from .focal import FocalLoss, focal_loss
from .info_nce import InfoNCELoss, info_nce
from .jsd import JSDLoss, jsd
from .linear_cross_entropy import (LinearCrossEntropyLoss, linear_cross_entropy,
                                   lm_head_cross_entropy)
from .linear_jsd import LinearJSDLoss, linear_jsd
from .log_probs import (LinearTokenLogProbs, LogProbs, TokenLogProbs, linear_log_probs,
                        lm_head_log_probs, log_probs)
from .sigmoid_focal import SigmoidFocalLoss, sigmoid_focal_loss
from .siglip import SigLipLoss, siglip_loss

__all__ = [
    "cross_entropy", "CrossEntropyLoss", "focal_loss", "FocalLoss", "sigmoid_focal_loss",
    "SigmoidFocalLoss", "info_nce", "InfoNCELoss", "linear_cross_entropy",
    "LinearCrossEntropyLoss", "jsd", "JSDLoss", "linear_jsd", "LinearJSDLoss", "siglip_loss",
    "SigLipLoss", "log_probs", "linear_log_probs", "LogProbs", "TokenLogProbs",
    "lm_head_cross_entropy", "lm_head_log_probs",
    "LinearTokenLogProbs", "available_backends", "reusable_graph",
]
__version__ = "0.1.0"

warn_if_extension_missing()
