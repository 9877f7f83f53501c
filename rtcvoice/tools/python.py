"""Python functions as tools: the signature's type hints become the JSON schema, the docstring the
description. Loaded by setting (``tools = "package.module:TOOLS"``) or from installed tool packs
(the ``rtcvoice.tools`` entry-point group).

    async def find_booking(reference: str, context: ToolInvocation) -> dict:
        \"\"\"Look up a booking by its reference.\"\"\"
        return await my_api.get_booking(reference, user=context.user_id)

A parameter annotated ``ToolInvocation`` gets the call's identity and is not shown to the model.
Sync functions run in a thread, so a blocking one never holds up the call.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import typing
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points
from typing import Any

import pydantic

from .base import Tool, ToolInvocation

ENTRY_POINT_GROUP = "rtcvoice.tools"


def tool_from_function(
    fn: Callable[..., Any], *, name: str | None = None, timeout_s: float | None = None
) -> Tool:
    """A Tool that runs ``fn``; ValueError if its signature cannot be described as JSON schema."""
    hints = typing.get_type_hints(fn)
    fields: dict[str, Any] = {}
    invocation: str | None = None
    for param in inspect.signature(fn).parameters.values():
        hint = hints.get(param.name, Any)
        if hint is ToolInvocation:
            invocation = param.name
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ValueError(f"tool {fn.__name__}: *args and **kwargs cannot be described to the model")
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[param.name] = (hint, default)
    try:
        model = pydantic.create_model(f"{fn.__name__}_arguments", **fields)
        schema = model.model_json_schema()
    except (pydantic.PydanticUserError, pydantic.PydanticSchemaGenerationError, TypeError) as exc:
        raise ValueError(
            f"tool {fn.__name__}: its arguments cannot be described as JSON schema: {exc}"
        ) from exc
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    schema.setdefault("properties", {})
    doc = inspect.getdoc(fn) or ""
    description = doc.split("\n\n")[0].replace("\n", " ").strip() or fn.__name__.replace("_", " ")

    async def run(arguments: dict[str, Any], call: ToolInvocation) -> Any:
        # The model's JSON, checked against the schema already, coerced to the hinted types.
        values = dict(model.model_validate(arguments))
        if invocation is not None:
            values[invocation] = call
        if inspect.iscoroutinefunction(fn):
            return await fn(**values)
        return await asyncio.to_thread(functools.partial(fn, **values))

    return Tool(
        name=name or fn.__name__,
        description=description,
        parameters=schema,
        run=run,
        source="python",
        timeout_s=timeout_s,
    )


def as_tools(value: object, where: str) -> list[Tool]:
    """Tools from what a module exports: a Tool, a function, or a list of either."""
    items: Iterable[object] = value if isinstance(value, (list, tuple)) else [value]
    tools: list[Tool] = []
    for item in items:
        if isinstance(item, Tool):
            tools.append(item)
        elif callable(item):
            tools.append(tool_from_function(item))
        else:
            raise ValueError(f"{where}: {item!r} is neither a function nor a Tool")
    return tools


def load_python_tools(spec: str) -> list[Tool]:
    """``package.module:NAME`` (a function, a Tool or a list), or the name of an installed tool
    pack (an entry point in the ``rtcvoice.tools`` group). ValueError says what is wrong."""
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"tools {spec!r}: cannot import {module_name}: {exc}") from exc
        if not hasattr(module, attr):
            raise ValueError(f"tools {spec!r}: {module_name} has no {attr}")
        return as_tools(getattr(module, attr), spec)
    found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == spec]
    if not found:
        installed = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
        raise ValueError(
            f"tools {spec!r}: no installed tool pack of that name (installed: {', '.join(installed) or 'none'}); "
            "to load from a module, write package.module:NAME"
        )
    return as_tools(found[0].load(), spec)
