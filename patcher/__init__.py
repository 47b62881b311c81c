"""patcher: Transformer-Patcher (Huang et al., ICLR 2023) for Hugging Face transformers.

Fix a deployed model's mistakes one at a time by adding one neuron per mistake (per wrong token
for generators) to its last feed-forward layer. No Prefect, MLflow or Great Expectations here:
this is a torch + transformers library usable from a notebook.
"""

from . import metrics
from .editor import Editor, PatcherConfig
from .errors import PatchError, SetupError, UnsupportedModelError
from .families import FAMILIES, Family, resolve_family
from .layer import PatchBlock, PatchedFFN, PatchedLinear
from .loading import load_model, resolve_device, resolve_dtype
from .manifest import PatchEntry, PatchManifest
from .metrics import Locality, locality, net_ratio
from .patchset import PatchSet, fingerprint
from .predict import predict, predicted_labels, served_correct, served_match, target_correct
from .records import EditRequest, EditResult

__all__ = [
    "Editor", "EditRequest", "EditResult", "PatcherConfig", "PatchSet", "PatchManifest", "PatchEntry", "PatchBlock",
    "PatchedFFN", "PatchedLinear", "PatchError", "SetupError", "UnsupportedModelError", "FAMILIES", "Family", "resolve_family",
    "fingerprint", "load_model", "resolve_device", "resolve_dtype", "predict", "predicted_labels", "served_correct",
    "served_match", "target_correct", "metrics", "Locality", "locality", "net_ratio",
]
