"""Errors a caller can act on. Everything the library raises on bad input is a PatchError."""


class PatchError(ValueError):
    """Bad input to the patcher (empty text, unknown label, too long, mismatched base...)."""


class UnsupportedModelError(PatchError):
    """The model's architecture has no row in patcher.families.FAMILIES."""
