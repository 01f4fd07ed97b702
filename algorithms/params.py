"""Components that declare their parameters once, as a pydantic model (evaluations, healings).

A component class sets ``Params`` (a subclass of :class:`Params`: frozen, unknown keys refused) and
inherits :class:`Parameterised`'s constructor, which takes a ``Params`` object, a mapping (a grid
section) or keywords, and keeps the validated model as ``self.params``. The *resolved* parameters
(every field with its default) are the component's identity.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base of a component's parameters: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Parameterised:
    """A component whose parameters are its ``Params`` model."""

    name: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params

    def __init__(self, params: Params | dict[str, Any] | None = None, **kwargs: Any) -> None:
        if isinstance(params, Params):
            if kwargs:
                raise TypeError("give parameters either as a Params object or as keywords, not both")
            if not isinstance(params, self.Params):
                raise TypeError(f"{self.name}: expected {self.Params.__name__}, got {type(params).__name__}")
            self.params = params
        else:
            self.params = self.Params.model_validate({**(params or {}), **kwargs})
