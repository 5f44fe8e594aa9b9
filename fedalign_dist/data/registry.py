"""Data sources and task types, chosen by name (`data.name`, `data.task`) from registries that
code outside the package fills too (`imports` / --import / entry points, before validation).
The built-in ones register when the package `fedalign_dist.data` is imported (its __init__),
so this module never imports them.

A source that declares knobs (`config_section`) gets the config section `data.<its name>`,
and so does a task type: both are validated, suggested and documented like built-in keys."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, ClassVar, TypeVar

if TYPE_CHECKING:
    from pydantic import BaseModel

    from fedalign_dist.data.corpus import Corpus

_SOURCES: dict[str, type["DataSource"]] = {}
_TASKS: dict[str, type] = {}
_RESERVED = {"name", "task", "partition", "alpha", "shards_per_client", "tokenizer", "max_length",
             "val_fraction", "test_fraction", "min_client_examples", "max_examples",
             "examples_per_client"}
"""DataConfig's own keys: a source or task type of that name would shadow one."""

T = TypeVar("T")


class DataSource(ABC):
    """Where examples come from. `load` returns every example of the data set as a Corpus;
    subsampling, partitioning over clients and splitting are done by the framework."""
    name: ClassVar[str] = ""
    config_section: ClassVar["type[BaseModel] | None"] = None
    """A pydantic model (subclass fedalign_dist.config.ConfigSection): the knobs at data.<name>."""
    natural_clients: ClassVar[bool | None] = None
    """Whether every example names its natural client (Corpus.groups); None = known only once
    loaded. False lets data.partition=natural be refused when the config is validated."""

    @classmethod
    def check_config(cls, config) -> None:
        """Refuse a configuration this source cannot serve (raise ValueError), before any rank starts."""
        if config.data.partition == "natural" and cls.natural_clients is False:
            with_clients = [n for n, c in sorted(_SOURCES.items()) if c.natural_clients]
            raise ValueError(f"data.partition=natural needs a data set whose examples name their client; "
                             f"data.name={cls.name} has none (built in: {', '.join(with_clients)})")

    def __init__(self, data_config):
        self.data_config = data_config
        self.options = getattr(data_config, self.name, None) if self.config_section is not None else None
        """This source's section data.<name>, or None when it declares none."""

    @abstractmethod
    def load(self) -> "Corpus":
        ...


def _register(table: dict, kind: str) -> Callable[[str], Callable[[T], T]]:
    def register(name: str) -> Callable[[T], T]:
        def wrap(cls: T) -> T:
            if name in _SOURCES or name in _TASKS:
                raise ValueError(f"data {kind} '{name}': that name is already a registered data source or task type")
            if name in _RESERVED:
                raise ValueError(
                    f"data {kind} '{name}': the name is a key of the data section ({', '.join(sorted(_RESERVED))})"
                )
            cls.name = name
            table[name] = cls
            return cls
        return wrap
    return register


register_source = _register(_SOURCES, "source")
"""@register_source("my_data") on a DataSource subclass: data.name=my_data selects it."""
register_task = _register(_TASKS, "task type")
"""@register_task("my_task") on a TaskType subclass (fedalign_dist.data.task): data.task=my_task."""


def registered_sources() -> list[str]:
    return sorted(_SOURCES)


def registered_tasks() -> list[str]:
    return sorted(_TASKS)


def source_class(name: str) -> type[DataSource]:
    return _SOURCES[name]


def task_class(name: str) -> type:
    return _TASKS[name]


def data_sections() -> dict[str, "type[BaseModel]"]:
    """{name: config section} of the sources and task types that declare knobs."""
    return {name: cls.config_section for name, cls in sorted({**_SOURCES, **_TASKS}.items())
            if cls.config_section is not None}

