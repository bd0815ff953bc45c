"""Server events held against their types (``agent.events.SERVER_EVENTS``) at run time."""

from __future__ import annotations

import types
from typing import Any, Literal, NotRequired, Union, get_args, get_origin, get_type_hints

from agent.events import SERVER_EVENTS, optional_keys

#: Fields a session adds to every event of a phone call (its subscribers hear several).
CARRIED = {"call_sid": str, "track": str}


def problems(event: dict[str, Any]) -> list[str]:
    """What in ``event`` its type does not allow (empty: it conforms)."""
    cls = SERVER_EVENTS.get(event.get("type"))  # type: ignore[arg-type]
    if cls is None:
        return [f"unknown event type {event.get('type')!r}"]
    extra = {k: v for k, v in event.items() if k in CARRIED and k not in get_type_hints(cls)}
    found = [f"{k}: not a {t.__name__}" for k, t in CARRIED.items() if k in extra and
             not isinstance(extra[k], t)]  # fmt: skip
    body = {k: v for k, v in event.items() if k not in extra}
    return found + _check_typeddict(cls, body, str(event["type"]))


def _check_typeddict(cls: type[Any], value: Any, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not an object"]
    hints = get_type_hints(cls, include_extras=True)
    optional = optional_keys(cls)
    found = [f"{where}.{k}: missing" for k in hints if k not in value and k not in optional]
    found += [f"{where}.{k}: not a field of {cls.__name__}" for k in value if k not in hints]
    for k, hint in hints.items():
        if k in value:
            found += _check(hint, value[k], f"{where}.{k}")
    return found


def _check(hint: Any, value: Any, where: str) -> list[str]:
    origin = get_origin(hint)
    if origin is NotRequired:
        return _check(get_args(hint)[0], value, where)
    if origin is Literal:
        return [] if value in get_args(hint) else [f"{where}: {value!r} not in {get_args(hint)}"]
    if origin in (Union, types.UnionType):
        options = [_check(h, value, where) for h in get_args(hint)]
        return [] if any(not o for o in options) else [f"{where}: {value!r} fits no {hint}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: {value!r} is not a list"]
        return [p for i, v in enumerate(value) for p in _check(get_args(hint)[0], v, where)]
    if origin is dict or hint is dict:
        return [] if isinstance(value, dict) else [f"{where}: {value!r} is not an object"]
    if hint is Any:
        return []
    if hint is None or hint is type(None):
        return [] if value is None else [f"{where}: {value!r} is not null"]
    if isinstance(hint, type) and hasattr(hint, "__required_keys__"):
        return _check_typeddict(hint, value, where)
    if hint is float:  # JSON numbers: an int is a float on the wire
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where}: {value!r} is not a number"]
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: {value!r} is not an integer"]
    if isinstance(hint, type):
        return [] if isinstance(value, hint) else [f"{where}: {value!r} is not a {hint.__name__}"]
    return [f"{where}: cannot check {hint!r}"]
