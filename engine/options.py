"""Options declared once, as typed dataclass fields, and the argparse parser generated from them.

A config section is a dataclass whose fields are `option(...)`s: the field's name gives the
flag (`lr_decay_style` -> `--lr-decay-style`), its type annotation the argparse type (bool ->
a switch, `list[X]` -> one or more values), its default the default, and the option carries the
help text and choices. `add_options` turns a section into an argument group and
`section_from_args` turns parsed flags back into the section, so a flag's name, type, default
and help live in one place. Flags the user did not give are absent from the namespace
(argparse.SUPPRESS), so the dataclass default applies and nothing is written twice.

Torch-free on purpose: the flag layer is the lowest in the package graph.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Sequence


class ConfigError(ValueError):
    """A flag combination that cannot run; the message names the flags and the rule."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def option(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None,
           type: Callable | None = None, metavar: str | None = None,
           aliases: dict[str, Any] | None = None, default_factory: Callable | Any = dataclasses.MISSING,
           negatable: bool = False, cli: bool = True) -> Any:
    """A config field that is also a command-line flag.

    `type` overrides the argparse type derived from the annotation (e.g. comma-separated lists);
    `aliases` maps extra flag spellings to the constant they set (Megatron-LM's --use-rope-scaling);
    `negatable` gives a bool both --flag and --no-flag (None when neither is given);
    `cli=False` declares a field that is filled in by code, not by a flag.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "type": type,
                "metavar": metavar, "aliases": aliases or {}, "negatable": negatable, "cli": cli}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def declared_fields(section: type) -> list[dataclasses.Field]:
    """The fields of a section that are command-line flags."""
    return [f for f in dataclasses.fields(section) if f.metadata.get("cli")]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _argparse_kwargs(f: dataclasses.Field, annotation: Any) -> dict:
    """argparse keywords for one field, from its annotation and its option metadata."""
    meta = f.metadata
    optional_args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(optional_args) == 1:
        annotation = optional_args[0]
    default = _default(f)
    help_text = meta["help"]
    if default not in (dataclasses.MISSING, None, False, []):
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        help_text += f" (default: {shown})"
    kwargs: dict[str, Any] = {"dest": f.name, "help": help_text, "default": argparse.SUPPRESS}
    if annotation is bool:
        return {**kwargs, "action": argparse.BooleanOptionalAction if meta["negatable"] else "store_true"}
    if typing.get_origin(annotation) is list:
        kwargs["nargs"] = "+"
        annotation = typing.get_args(annotation)[0]
    kwargs["type"] = meta["type"] or annotation
    if meta["choices"] is not None:
        kwargs["choices"] = meta["choices"]
    if meta["metavar"] is not None:
        kwargs["metavar"] = meta["metavar"]
    if default is dataclasses.MISSING:
        kwargs["required"] = True
    return kwargs


def add_options(parser: argparse.ArgumentParser, section: type, title: str,
                only: Sequence[str] | None = None) -> argparse._ArgumentGroup:
    """One argument group with a flag per declared field of `section` (or per field named in `only`: a tool that
    reads some of another program's flags declares them from the same fields)."""
    description = None if only is not None else (section.__doc__ or "").strip().splitlines()[0]
    group = parser.add_argument_group(title, description)
    hints = typing.get_type_hints(section)
    for f in declared_fields(section):
        if only is not None and f.name not in only:
            continue
        group.add_argument(flag_name(f.name), **_argparse_kwargs(f, hints[f.name]))
        for alias, const in f.metadata["aliases"].items():
            group.add_argument(alias, dest=f.name, action="store_const", const=const, default=argparse.SUPPRESS,
                               help=f"same as {flag_name(f.name)}" + ("" if const is True else f" {const}"))
    return group


def given(args: argparse.Namespace, section: type) -> dict[str, Any]:
    """The flags of `section` present on the command line (absent ones keep the dataclass default)."""
    return {f.name: getattr(args, f.name) for f in declared_fields(section) if hasattr(args, f.name)}


def values_from_args(args: argparse.Namespace, section: type, names: Sequence[str]) -> dict[str, Any]:
    """The named fields of `section`: the flags given, the declared defaults for the others."""
    fields = {f.name: f for f in declared_fields(section)}
    return {name: getattr(args, name) if hasattr(args, name) else _default(fields[name]) for name in names}


def section_from_args(section: type, args: argparse.Namespace, **overrides: Any):
    """Build one config section from parsed flags; a rule it breaks becomes ConfigError."""
    try:
        return section(**{**given(args, section), **overrides})
    except TypeError as err:  # a required field without a flag: argparse normally catches it first
        raise ConfigError(str(err)) from None


def check_choices(section: Any) -> None:
    """Every declared field with choices holds one of them (or None where None is the default)."""
    for f in declared_fields(type(section)):
        choices = f.metadata["choices"]
        value = getattr(section, f.name)
        if choices is None or value is None and _default(f) is None:
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            require(item in choices, f"{flag_name(f.name)} {item}: choose from {', '.join(map(str, choices))}")


class Section:
    """Base of the config sections: choices are checked, then the section's own `check()` rules."""

    def __post_init__(self) -> None:
        check_choices(self)
        self.check()

    def check(self) -> None:
        """Rules within the section; raise ConfigError naming the flag."""
