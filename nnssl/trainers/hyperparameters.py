"""Hyperparameters declared once: one class-level declaration gives the default, the logging and the checkpoint.

    class nnSSL_MyTrainer(nnSSLTrainer):
        ema_decay = hyperparameter(0.99, "EMA decay per optimizer step (paper: 0.99)")

``self.ema_decay`` reads 0.99 until something sets it (an ``__init__`` of a subclass, a test); every declared
name is listed by :func:`hyperparameters_of`, which the base trainer logs at ``initialize`` (nnU-Net's
``update_config``) and stores in each checkpoint. A subclass changes a default by declaring the name again
(``unsup_weight = hyperparameter(0.1, ...)``) or by a plain class attribute (``unsup_weight = 0.1``): both stay
listed, because the name was declared somewhere in the class hierarchy.
"""

from __future__ import annotations

import copy
from typing import Any, Dict


class hyperparameter:  # noqa: N801 (used like a field declaration)
    """A trainer attribute with a default and a one-line description (paper value and unit).

    A data descriptor: instances hold their own value (set in ``__init__`` or later) in their ``__dict__``;
    unset, the default is returned (mutable defaults are copied per instance on first read).
    """

    def __init__(self, default: Any, doc: str = ""):
        self.default = default
        self.doc = doc
        self.name = None

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, instance, owner=None):
        if instance is None:
            return self
        if self.name not in instance.__dict__:
            instance.__dict__[self.name] = copy.copy(self.default)
        return instance.__dict__[self.name]

    def __set__(self, instance, value) -> None:
        instance.__dict__[self.name] = value

    def __repr__(self) -> str:
        return f"hyperparameter({self.default!r}, {self.doc!r})"


def hyperparameters_of(obj) -> Dict[str, Any]:
    """Every hyperparameter declared in ``type(obj)``'s class hierarchy, base classes first, with its current
    value on ``obj``."""
    names = []
    for cls in reversed(type(obj).__mro__):
        for name, value in vars(cls).items():
            if isinstance(value, hyperparameter) and name not in names:
                names.append(name)
    return {name: getattr(obj, name) for name in names}
