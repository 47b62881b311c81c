"""patcher: Transformer-Patcher (Huang et al., ICLR 2023) for Hugging Face transformers.

Fix a deployed model's mistakes one at a time by adding one neuron per mistake (per wrong token
for generators) to its last feed-forward layer. No Prefect, MLflow or Great Expectations here:
this is a torch + transformers library usable from a notebook.
"""

from . import metrics
from .editor import EditRequest, EditResult, Editor, PatcherConfig
from .errors import PatchError, UnsupportedModelError
from .families import FAMILIES, Family, resolve_family
from .layer import PatchBlock, PatchedFFN, PatchedLinear
from .patchset import PatchSet, fingerprint, load_model
from .predict import predict, predicted_labels, target_correct

__all__ = [
    "Editor", "EditRequest", "EditResult", "PatcherConfig", "PatchSet", "PatchBlock", "PatchedFFN",
    "PatchedLinear", "PatchError", "UnsupportedModelError", "FAMILIES", "Family", "resolve_family",
    "fingerprint", "load_model", "predict", "predicted_labels", "target_correct", "metrics",
]
