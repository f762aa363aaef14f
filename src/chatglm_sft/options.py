"""Typed command options: one dataclass per command, declared once, shared by the command line and YAML.

A field is an option. Its annotation is the type, its default the default, the string literal under it the
`--help` text, and `option(...)` its allowed values::

    @dataclass
    class PredictOptions:
        batch_size: int = option(8, ge=1)
        \"\"\"Prompts generated together.\"\"\"

Adding an option is adding one field: `add_options` makes the `--batch-size` flag, `build` reads it (from the
command line, a YAML mapping, or both), converts it to the field's type and checks its range, before anything
is loaded. A field whose type is itself an options dataclass (e.g. `SamplingParams`) contributes its fields as
flags of their own. A dataclass may define `check_options(self)` for rules that involve several fields.

A bad value raises `OptionError`: one line naming the option and what it allows; the CLI exits 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any

from chatglm_sft.errors import UserError

# Flags never contain underscores; YAML keys may use either spelling.


class OptionError(UserError):
    """An option value outside what the option allows (the CLI exits 2, like argparse)."""


@dataclass(frozen=True)
class Rule:
    """What values an option allows besides its type."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[str, ...] | None = None
    exists: str | None = None
    """`file`, `dir` or `path`: the value names something that must exist (checked with `check_paths`)."""
    required: bool = False
    repeat: bool = False
    """List option given by repeating the flag (`--stop A --stop B`) instead of a comma-separated value."""
    metavar: str | None = None

    def describe(self) -> str:
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return " and ".join(
            f"{op} {v:g}" if isinstance(v, float) else f"{op} {v}" for op, v in bounds if v is not None
        )


def option(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: typing.Iterable[str] | None = None,
    exists: str | None = None,
    required: bool = False,
    repeat: bool = False,
    metavar: str | None = None,
) -> Any:
    """A dataclass field with its allowed values (see the module docstring)."""
    rule = Rule(ge, gt, le, lt, tuple(choices) if choices is not None else None, exists, required, repeat, metavar)
    if default is MISSING and default_factory is MISSING:
        default = None
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"rule": rule})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# --- reading the declaration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    name: str
    kind: type
    """int, float, str, bool, list (of str) or an options dataclass."""
    optional: bool
    rule: Rule
    doc: str
    default: Any


@functools.cache
def specs(cls: type) -> tuple[Spec, ...]:
    """The options of `cls` in declaration order."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        kind, optional = _kind(hints[f.name])
        default = (
            f.default
            if f.default is not MISSING
            else (f.default_factory() if f.default_factory is not MISSING else None)
        )
        out.append(Spec(f.name, kind, optional, f.metadata.get("rule", Rule()), docs.get(f.name, ""), default))
    return tuple(out)


def _kind(hint) -> tuple[type, bool]:
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        kind, _ = _kind(rest[0])
        return kind, len(rest) < len(args)
    if origin in (list, tuple):
        return list, False
    return hint, False


def field_docs(cls: type) -> dict[str, str]:
    """Field docstrings, read from the class sources (base classes included): they double as `--help`."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        body = ast.parse(inspect.cleandoc("\n" + inspect.getsource(klass))).body[0].body
        for node, after in zip(body, body[1:], strict=False):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(node.target, ast.Name)
            ):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# --- the command line ---------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors on one line (`chatglm-sft train: error: ...`, exit 2), no usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_options(parser: argparse.ArgumentParser, cls: type, base: Any = None) -> None:
    """One flag per option of `cls`. Flags default to None, so only what the user typed overrides YAML or the
    declared default; values stay text until `build` converts and checks them."""
    for spec in specs(cls):
        default = getattr(base, spec.name) if base is not None else spec.default
        if dataclasses.is_dataclass(spec.kind):
            add_options(parser, spec.kind, default)
            continue
        notes = ["required"] if spec.rule.required else []
        if default not in (None, [], (), "") and spec.kind is not bool:
            notes.append(f"default: {default}")
        if spec.rule.describe():
            notes.append(spec.rule.describe())
        help_text = (spec.doc + (f" ({'; '.join(notes)})" if notes else "")).replace("%", "%%")
        metavar = spec.rule.metavar or ("{" + ",".join(spec.rule.choices) + "}" if spec.rule.choices else None)
        if spec.kind is bool:
            parser.add_argument(flag(spec.name), nargs="?", const="true", default=None, help=help_text, metavar="BOOL")
        elif spec.kind is list and spec.rule.repeat:
            parser.add_argument(flag(spec.name), action="append", default=None, help=help_text, metavar=metavar)
        else:
            parser.add_argument(flag(spec.name), default=None, help=help_text, metavar=metavar)


def given(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The values of `cls`'s options that were typed on the command line."""
    out = {}
    for spec in specs(cls):
        if dataclasses.is_dataclass(spec.kind):
            out.update(given(spec.kind, namespace))
        elif getattr(namespace, spec.name, None) is not None:
            out[spec.name] = getattr(namespace, spec.name)
    return out


# --- building and checking ----------------------------------------------------------------------------------------


def build(cls: type, values: dict[str, Any], source: str | None = None, check_paths_exist: bool = False):
    """An instance of `cls` from `values` (text or YAML values, flat: nested options by their own names), every
    value converted and range-checked. Unknown names are errors naming `source` (the YAML file)."""
    values = {k.replace("-", "_"): v for k, v in values.items()}
    unknown = sorted(set(values) - set(_all_names(cls)))
    if unknown:
        where = f"{source}: " if source else ""
        raise OptionError(f"{where}unknown option(s) {', '.join(unknown)}")
    obj = _build(cls, values)
    check(obj)
    if check_paths_exist:
        check_paths(obj)
    return obj


def _all_names(cls: type) -> list[str]:
    names = []
    for spec in specs(cls):
        names.extend(_all_names(spec.kind) if dataclasses.is_dataclass(spec.kind) else [spec.name])
    return names


def _build(cls: type, values: dict[str, Any], base: Any = None):
    """`cls(...)` from `values`, or `base` (a nested option's declared default) with `values` on top."""
    kwargs = {}
    for spec in specs(cls):
        if dataclasses.is_dataclass(spec.kind):
            kwargs[spec.name] = _build(spec.kind, values, spec.default)
        elif spec.name in values:
            value = convert(spec, values[spec.name])
            kwargs[spec.name] = tuple(value) if isinstance(spec.default, tuple) and value is not None else value
    return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)


def convert(spec: Spec, value: Any) -> Any:
    """`value` (text from the command line, or a YAML/JSON value) as the option's type."""
    if value is None:
        return None
    kind = spec.kind
    try:
        if kind is bool:
            return _to_bool(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        if kind is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list | tuple):
                raise ValueError
            return [str(v) for v in value]
        if kind is str:
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (ValueError, TypeError):
        raise OptionError(f"{flag(spec.name)} {value!r}: expected {_type_name(kind)}") from None
    return value


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _type_name(kind: type) -> str:
    return {
        int: "an integer",
        float: "a finite number",
        bool: "true or false",
        list: "a list",
        str: "text",
    }.get(kind, kind.__name__)


def check(obj: Any) -> None:
    """Raise `OptionError` for the first value of `obj` (and its nested options) outside its allowed values."""
    for spec in specs(type(obj)):
        value = getattr(obj, spec.name)
        if dataclasses.is_dataclass(spec.kind):
            check(value)
            continue
        if value is None or value == "":
            if spec.rule.required:
                raise OptionError(f"{flag(spec.name)} is required")
            if value is None and not spec.optional and spec.default is not None:
                raise OptionError(f"{flag(spec.name)}: a value is required ({spec.doc})")
            continue
        _check_type(spec, value)
        _check_range(spec, value)
    extra = getattr(obj, "check_options", None)
    if extra is not None:
        extra()


def _check_type(spec: Spec, value: Any) -> None:
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v),
    }.get(spec.kind, lambda v: True)
    if not ok(value):
        raise OptionError(f"{flag(spec.name)} {value!r}: expected {_type_name(spec.kind)}")


def _check_range(spec: Spec, value: Any) -> None:
    rule = spec.rule
    if rule.choices is not None and value not in rule.choices:
        raise OptionError(f"{flag(spec.name)} {value!r}: must be one of {', '.join(rule.choices)}")
    if spec.kind in (int, float):
        bad = (
            (rule.ge is not None and value < rule.ge)
            or (rule.gt is not None and value <= rule.gt)
            or (rule.le is not None and value > rule.le)
            or (rule.lt is not None and value >= rule.lt)
        )
        if bad:
            raise OptionError(f"{flag(spec.name)} {value}: out of range, must be {rule.describe()}")


def check_paths(obj: Any) -> None:
    """Raise `OptionError` for the first option naming a file or folder that does not exist."""
    for spec in specs(type(obj)):
        value = getattr(obj, spec.name)
        if dataclasses.is_dataclass(spec.kind):
            check_paths(value)
        elif spec.rule.exists and value:
            for item in value if isinstance(value, list | tuple) else [value]:
                _check_path(spec, item)


def _check_path(spec: Spec, value: str) -> None:
    path = Path(value.split("=", 1)[1] if "=" in value and not Path(value).exists() else value)
    if not path.exists():
        raise OptionError(f"{flag(spec.name)} {value}: no such {'folder' if spec.rule.exists == 'dir' else 'file'}")
    if spec.rule.exists == "dir" and not path.is_dir():
        raise OptionError(f"{flag(spec.name)} {value}: not a folder")
    if spec.rule.exists == "file" and not path.is_file():
        raise OptionError(f"{flag(spec.name)} {value}: not a file")


def as_dict(obj: Any) -> dict[str, Any]:
    """The options as a flat mapping (nested options by their own names), e.g. for a YAML dump."""
    out = {}
    for spec in specs(type(obj)):
        value = getattr(obj, spec.name)
        if dataclasses.is_dataclass(spec.kind):
            out.update(as_dict(value))
        else:
            out[spec.name] = list(value) if isinstance(value, tuple) else value
    return out
