"""Task spec strings: ``KIND:TARGET[,key=value]...``, parsed into a task config.

Grammar::

    SPEC    := KIND ":" TARGET ( "," KEY "=" VALUE )*
    KIND    := a registered task kind (ppl, mmlu, hellaswag, lm_eval)
    TARGET  := what to evaluate on: a file, folder, dataset or task name (no commas)
    KEY     := a field of the kind's config dataclass (e.g. seq_len, limit, shots)
    VALUE   := an integer, a number, a word, true/false, or for a list A+B+C

Examples: ``ppl:wiki.test.raw,seq_len=1024,stride=512``, ``mmlu:data/mmlu,limit=20``,
``hellaswag:data/hellaswag,limit=500``, ``lm_eval:hellaswag,limit=100``, ``lm_eval:my_task,include_path=tasks/``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from depthprune.errors import InputError, check_choice

__all__ = ["LIST_SEPARATOR", "RawSpec", "build_config", "convert_option", "option_fields", "split_spec"]

LIST_SEPARATOR = "+"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# Config fields that a spec may not set: they belong to the caller, not the protocol.
_HIDDEN = frozenset({"show_progress", "log_samples"})


@dataclass(frozen=True)
class RawSpec:
    """A spec string split into its parts, before its options are typed."""

    text: str
    kind: str
    target: str
    options: dict[str, str]


def split_spec(text: str, kinds: list[str]) -> RawSpec:
    """Split ``KIND:TARGET[,key=value]...`` and check the kind and the option syntax.

    Raises:
        InputError: no kind, an unknown kind, no target, an option without ``=``, or a
            repeated option.
    """
    example = "e.g. ppl:wiki.test.raw,seq_len=1024 or mmlu:data/mmlu,limit=20"
    spec = text.strip()
    kind, sep, rest = spec.partition(":")
    kind = kind.strip()
    if not sep or not kind:
        raise InputError(f"task spec {text!r} has no kind; expected KIND:TARGET[,key=value...] with KIND one of {', '.join(kinds)} ({example})")
    check_choice(kind, kinds, "task kind", f" in {text!r}")
    target, *pieces = rest.split(",")
    target = target.strip()
    if not target:
        raise InputError(f"task spec {text!r} has no target after '{kind}:'; expected {kind}:TARGET ({example})")
    options: dict[str, str] = {}
    for piece in pieces:
        key, eq, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise InputError(f"option {piece.strip()!r} in {text!r} is not key=value; paths with commas are not supported")
        if key in options:
            raise InputError(f"option {key!r} is given twice in {text!r}")
        options[key] = value
    return RawSpec(spec, kind, target, options)


def option_fields(config_cls: type) -> dict[str, Any]:
    """The fields of a config dataclass that a spec may set, with their resolved types."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls) if f.name not in _HIDDEN}


def _members(tp: Any) -> tuple[Any, ...]:
    """The members of a union (``X | None``), or the type itself."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def convert_option(key: str, value: str, tp: Any, where: str) -> Any:
    """Turn the text of an option into a value of the config field's type.

    Raises:
        InputError: the text is not a value of that type.
    """
    members = [m for m in _members(tp) if m is not type(None)]
    if value.lower() == "none" and type(None) in _members(tp):
        return None
    for m in members:
        origin = typing.get_origin(m)
        if origin is Literal:
            choices = [str(c) for c in typing.get_args(m)]
            return check_choice(value, choices, f"value of option {key}", f" in {where}")
        if m is bool:
            if value.lower() in _TRUE + _FALSE:
                return value.lower() in _TRUE
            raise InputError(f"option {key}={value} in {where} must be true or false")
        if m is int:
            try:
                return int(value)
            except ValueError:
                raise InputError(f"option {key}={value} in {where} must be an integer") from None
        if m is float:
            try:
                return float(value)
            except ValueError:
                raise InputError(f"option {key}={value} in {where} must be a number") from None
        if origin is tuple:
            items = tuple(v.strip() for v in value.split(LIST_SEPARATOR) if v.strip())
            if not items:
                raise InputError(f"option {key}={value} in {where} is an empty list; join items with {LIST_SEPARATOR}")
            return items
        if m is str:
            return value
    raise InputError(f"option {key} in {where} has a type ({tp}) that specs cannot set")


def build_config(config_cls: type, raw: RawSpec, defaults: dict[str, Any] | None = None) -> Any:
    """The kind's config from the spec's options, over ``defaults`` for fields it leaves out.

    Raises:
        InputError: an unknown option (with the closest name), a bad value, or a value
            that the config rejects.
    """
    fields = option_fields(config_cls)
    values: dict[str, Any] = {}
    for key, text in raw.options.items():
        check_choice(key, fields, "option", f" for {raw.kind} in {raw.text!r}")
        values[key] = convert_option(key, text, fields[key], repr(raw.text))
    all_fields = {f.name for f in dataclasses.fields(config_cls)}
    for key, value in (defaults or {}).items():
        if key in all_fields and key not in values:
            values[key] = value
    try:
        return config_cls(**values)
    except InputError as exc:
        raise InputError(f"{raw.text!r}: {exc}") from exc
