"""`fedalign-dist config show`: every key of a resolved config with its value, type and the
documentation its schema declares (field docstrings), one section after another."""
from __future__ import annotations

import types
import typing

from pydantic import BaseModel


def _type_name(annotation) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _lines(section: BaseModel, prefix: str) -> list[str]:
    """The section's own keys, then its sub-sections (so a key never sits under another's header)."""
    out, nested = [], []
    for name, field in type(section).model_fields.items():
        value, key = getattr(section, name), f"{prefix}{name}"
        doc = " ".join((field.description or "").split())
        if isinstance(value, BaseModel):
            nested += [f"\n[{key}]" + (f"  {doc}" if doc else ""), *_lines(value, key + ".")]
        else:
            out.append(f"{key} = {value!r}  ({_type_name(field.annotation)})" + (f"\n    {doc}" if doc else ""))
    return out + nested


def describe_config(config: BaseModel) -> str:
    return "\n".join(_lines(config, "")).lstrip("\n")
