"""The error every layer raises for a model that cannot be read or loaded."""
from __future__ import annotations


class LoadError(RuntimeError):
    """A model folder could not be loaded; the message is one sentence a user can act on."""
