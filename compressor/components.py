"""What every plugin-provided component has: a name, an options model, a one-line summary.

A component class is generic in its options model, and that one declaration serves both
the type checker and the registry:

    class LogitL1(LossTerm[L1Options]):
        name = "logit_l1"

gives `self.options: L1Options` in the body, and the registry validates a recipe entry
against `L1Options` (`LogitL1.Options`). A component without options takes `NoOptions`.
"""

from __future__ import annotations

import typing
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


OptionsT = TypeVar("OptionsT", bound=BaseModel)


class Component(Generic[OptionsT]):
    """Base of loaders, passes, losses, optimizers, schedules, evaluators and exporters.

    The registry constructs a component once per recipe entry, from its validated options;
    recipes pick it by `name`.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions
    options: OptionsT

    def __init__(self, options: OptionsT | None = None):
        self.options = options if options is not None else typing.cast(OptionsT, self.Options())

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Options" in cls.__dict__:
            return
        for base in cls.__dict__.get("__orig_bases__", ()):
            for arg in typing.get_args(base):
                if isinstance(arg, type) and issubclass(arg, BaseModel):
                    cls.Options = arg
                    return

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring: what `compress plugins` shows."""
        doc = (cls.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""
