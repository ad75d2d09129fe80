"""Khutulun: a distributed declarative orchestrator for services, speaking TOSCA.

The supported Python surface is small: the model (:mod:`khutulun.model`), the errors (:mod:`khutulun.errors`),
the delegate interface (:mod:`khutulun.delegates`) and the loader (:func:`khutulun.tosca.load`). Everything
else is internal to the agent and the CLI.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
