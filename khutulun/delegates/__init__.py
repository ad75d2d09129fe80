"""Delegates: one per kind of resource, found through the ``khutulun.delegates`` entry point group.

A third-party package adds a delegate by declaring, in its ``pyproject.toml``::

    [project.entry-points."khutulun.delegates"]
    mykind = "mypackage.delegate:MyDelegate"

where ``MyDelegate`` subclasses :class:`Delegate` and sets ``name = "mykind"``.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from khutulun.delegates.base import Capabilities, Delegate, DelegateContext, ExecSession
from khutulun.errors import InternalError

__all__ = ["Capabilities", "Delegate", "DelegateContext", "ExecSession", "delegate_classes"]

ENTRY_POINT_GROUP = "khutulun.delegates"


def delegate_classes() -> dict[str, type[Delegate]]:
    """Every installed delegate class by name; two packages claiming one name is an error, not a choice."""
    found: dict[str, type[Delegate]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in found:
            raise InternalError(f"two delegates are installed under the name {ep.name!r}")
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Delegate)):
            raise InternalError(f"entry point {ep.value!r} ({ep.name}) is not a Delegate subclass")
        if cls.name != ep.name:
            raise InternalError(f"delegate {ep.value!r} is registered as {ep.name!r} but calls itself {cls.name!r}")
        found[ep.name] = cls
    return found
