"""The error every model loader raises: a folder, an embedded model or a GGUF file that cannot be used."""

from __future__ import annotations

from localio.errors import user_error


@user_error
class ModelLoadError(ValueError):
    """A model folder that cannot be loaded (missing, incomplete, unsupported)."""
