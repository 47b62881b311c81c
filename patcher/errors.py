"""Errors a caller can act on. Everything the library raises on bad input is a PatchError."""


class PatchError(ValueError):
    """Bad input to the patcher (empty text, unknown label, too long, mismatched base...)."""


class SetupError(RuntimeError):
    """The patcher cannot run as configured on this machine (``compile`` without a compiler...):
    no edit can succeed, so it is not one record's fault."""


class UnsupportedModelError(PatchError):
    """The model's architecture has no row in patcher.families.FAMILIES."""
