"""The one config engine: every config dataclass of vitkit (model, stem, data, optimizer, fine-tuning,
training) is read, checked and written by these functions.

- The type hints are the schema. ``Literal[...]`` types are the one list of allowed values; ``Optional``,
  unions, ``int``/``float``/``str``/``bool``, tuples and lists of them, mappings, and nested config
  dataclasses (read from a mapping, e.g. a YAML section or a ``config.json`` object) are understood.
- :func:`check_fields` (called by each dataclass's ``__post_init__``) checks every field against its hint
  and normalises what JSON and YAML read loosely (a list where a tuple belongs, ``1e-3`` read as a string
  by YAML 1.1, an int where a float belongs), so a config built in Python is checked like one read from
  a file. A float is finite: NaN (which compares false with every bound) and infinity are refused by name.
- :func:`from_mapping` builds a dataclass from a mapping; an unknown key is an error with a "did you
  mean" suggestion, and every error names the file (``source``) and the dotted key.
- :func:`to_plain` turns a dataclass tree back into plain JSON/YAML values.

This module imports nothing from vitkit, so every layer (models included) may use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the key (and the file, when read from one)."""


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The resolved type hint of every field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def allowed_values(literal: Any) -> tuple[Any, ...]:
    """The values a ``Literal[...]`` type (or an ``Optional`` of one) allows."""
    if typing.get_origin(literal) in (Union, types.UnionType):
        return tuple(v for arg in typing.get_args(literal) for v in allowed_values(arg))
    return typing.get_args(literal) if typing.get_origin(literal) is Literal else ()


def check_fields(obj: Any, *, prefix: str = "") -> None:
    """Check every field of the dataclass instance ``obj`` against its type hint, normalising values in
    place (lists to tuples where a tuple is declared, ints to floats, nested mappings to dataclasses)."""
    for name, hint in field_types(type(obj)).items():
        value = getattr(obj, name)
        coerced = coerce(value, hint, f"{prefix}{name}")
        if coerced is not value:
            object.__setattr__(obj, name, coerced)  # works for frozen dataclasses too


def checked_fields(cls: type, data: Any, *, source: str = "config", prefix: str = "",
                   known: str | None = None) -> dict[str, Any]:
    """Some fields of the dataclass ``cls``, each checked against its type hint (nested sections built), without
    building ``cls``: the overrides of a config another step completes (a training config's ``model`` section).
    Keys ``cls`` does not have are errors with the closest known key; ``known`` names what has the keys."""
    where = prefix.rstrip(".")
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_at(source)}{where or 'the config'} must be a mapping of keys, got {_show(data)}")
    fields = field_types(cls)
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{_at(source)}unknown config key {prefix}{key}{hint}; "
                              f"{known or where or 'the top level'} has: {', '.join(fields)}")
    kwargs = {}
    for key, value in data.items():
        hint = fields[key]
        nested = _dataclass_in(hint)
        if nested is not None and isinstance(value, Mapping):
            kwargs[key] = from_mapping(nested, value, source=source, prefix=f"{prefix}{key}.")
        else:
            try:
                kwargs[key] = coerce(value, hint, f"{prefix}{key}")
            except ConfigError as e:
                raise ConfigError(f"{_at(source)}{e}") from None
    return kwargs


def from_mapping(cls: type[T], data: Any, *, source: str = "config", prefix: str = "") -> T:
    """An instance of the dataclass ``cls`` from a mapping of its field names; keys it does not have are
    errors (with the closest known key), and every error starts with ``source`` (unless empty) and names
    the key, dotted with ``prefix`` (e.g. ``stem.``)."""
    where = prefix.rstrip(".")
    if isinstance(data, cls):
        return data
    kwargs = checked_fields(cls, data, source=source, prefix=prefix)
    missing = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{_at(source)}missing key(s) {', '.join(prefix + name for name in missing)}"
                          f"{' in ' + where if where else ''}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{_at(source)}{_prefixed(str(e), prefix)}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{_at(source)}{where + ': ' if where and where not in str(e) else ''}{e}") from None


def describe_yaml_error(error: Exception) -> str:
    """A ``yaml.YAMLError`` on one line, with its position; a Python tag (``!!python/object:...``) is said to be
    refused, since configs are read as plain YAML (``yaml.safe_load``), never as objects that could run code."""
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = " ".join(str(getattr(error, "problem", None) or error).split())
    tag = re.search(r"tag '(tag:yaml\.org,2002:)?([^']+)'", problem)
    if tag and "constructor" in problem:
        return (f"the YAML tag !!{tag.group(2)}{where} is refused: configs are plain YAML (numbers, strings, lists, "
                "mappings), never Python objects")
    return f"not valid YAML: {problem}{where}"


OMIT_DEFAULT = {"omit_default": True}
"""Field metadata (``field(default=..., metadata=OMIT_DEFAULT)``): :func:`to_plain` leaves the field out while it
holds its default, for compact records that older files and readers share (a hybrid's stem, preprocessing)."""


def to_plain(value: Any) -> Any:
    """Dataclasses to dicts, tuples to lists: values ``json.dumps`` and ``yaml.safe_dump`` write as is. The one
    way every config record becomes a mapping (their ``to_dict``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_default") and getattr(value, f.name) == f.default)}
    if isinstance(value, Mapping):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return value


def coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` checked against the type ``hint`` (and converted where a file reads it loosely); a
    mismatch raises :class:`ConfigError` naming ``key``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(f"{key} must be {_describe(hint)}, got {_show(value)}")
    if origin is Literal:
        if isinstance(value, bool) or value not in args:
            raise ConfigError(f"{key} must be one of {_choices(args)}; got {_show(value)}")
        return value
    if hint is Any or hint is object:
        return value
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return _nested(hint, value, key)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # NaN compares false with every bound and would pass each check
                raise ConfigError(f"{key} must be a finite number, got {_show(value)}")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # YAML reads `run_name: 2024` as a number
    elif origin in (tuple, list) and isinstance(value, (list, tuple)):
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} entries, got {_show(value)}")
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    elif origin in (dict, Mapping) or hint is dict:
        if isinstance(value, Mapping):
            return dict(value)
    raise ConfigError(f"{key} must be {_describe(hint)}, got {_show(value)}")


def _nested(cls: type, value: Mapping[str, Any], key: str) -> Any:
    """A nested config dataclass from a mapping, its errors naming ``key.subkey``."""
    return from_mapping(cls, value, source="", prefix=f"{key}.")


def _at(source: str) -> str:
    """``"config.json: "``, the start of an error about a file; nothing when the caller adds it."""
    return f"{source}: " if source else ""


def _dataclass_in(hint: Any) -> type | None:
    """The config dataclass a field holds (``X`` or ``Optional[X]``), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    if typing.get_origin(hint) in (Union, types.UnionType):
        found = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return found[0] if len(found) == 1 else None
    return None


def _prefixed(message: str, prefix: str) -> str:
    """A nested dataclass's field error (``embed_dim must be ...``) with the section's dotted prefix."""
    return f"{prefix}{message}" if prefix and not message.startswith(prefix) else message


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        parts = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    if origin in (dict, Mapping) or hint is dict:
        return "a mapping"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if hint in names:
        return names[hint]
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {hint.__name__} keys"
    return f"a {getattr(hint, '__name__', hint)}"


def _choices(values: tuple) -> str:
    """Allowed values for a message; the empty string is shown so that a reader can see it is one."""
    return ", ".join("'' (none)" if value == "" else str(value) for value in values)


def _show(value: Any) -> str:
    """The offending value as the file had it, e.g. ``'abc' (a string)``, ``[1, 2] (a list)``."""
    kind = {str: "a string", list: "a list", tuple: "a list", dict: "a mapping", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    text = repr(value) if not isinstance(value, tuple) else repr(list(value))
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({kind})" if value is not None else "null"
