"""Command-line options read from the config dataclasses, so that each field is written once.

A field's docstring is its option's help, its default the option's shown default, and the
metadata of :func:`~internal_policy_lens.config.option` its limits, flags and list separator.
A command names the config it builds and the fields it leaves out (:func:`offers`); a new field
of that config is a new option without any change here or in ``cli.py``.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import typer


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of dataclass ``cls``, as one line of plain text.

    A field of ``cls`` named in a docstring (``out``) reads as its flag (--out).
    """
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    flags = {f.name: _long_flag(f) for f in fields(cls)}
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = _plain(after.value.value, flags)
    return docs


def _long_flag(f: Field) -> str:
    """``--name``, or the field's own flag (its first half for an on/off pair)."""
    own = [flag for flag in f.metadata.get("flags", ()) if flag.startswith("--")]
    return own[0].split("/")[0] if own else "--" + f.name.replace("_", "-")


def _plain(doc: str, flags: dict[str, str]) -> str:
    """Sphinx markup out: ``out`` -> --out (a field) or out, :class:`~pkg.mod.Name` -> Name."""
    text = " ".join(doc.split())
    text = re.sub(r":\w+:`~?(?:[\w.]*\.)?(\w+)`", r"\1", text)
    return re.sub(r"``(.*?)``", lambda m: flags.get(m[1], m[1]), text)


@dataclass(frozen=True)
class Offered:
    """One config field as a command-line parameter."""

    path: tuple[str, ...]
    """Where the value goes: ``("generation", "batch_size")`` for a nested config's field."""
    parameter: inspect.Parameter
    """The parameter typer reads (its annotation carries the typer.Option or typer.Argument)."""
    convert: Callable[[Any], Any]
    """From what typer parsed to the config's value."""


def _converter(meta: dict, int_or_str: bool) -> Callable[[Any], Any]:
    """From typer's value to the field's: split, a path's text, or an integer where it reads so."""
    if "sep" in meta:
        return lambda text: text.split(meta["sep"])
    if meta.get("path"):
        return lambda p: [str(x) for x in p] if isinstance(p, list) else str(p)
    if int_or_str:
        return lambda text: int(text) if text.lstrip("-").isdigit() else text
    return lambda value: value


def _types(hint: Any) -> list[Any]:
    """The types a field may hold, None left out (``int | None`` -> [int])."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [t for t in typing.get_args(hint) if t is not type(None)]
    return [hint]


def _shown_default(f: Field) -> str | None:
    """The default as the help shows it; None for one computed when the config is made."""
    if f.default is MISSING:
        value = f.default_factory() if f.default_factory is not MISSING else None
        return f.metadata.get("sep", ",").join(value) if isinstance(value, list) else None
    if f.default is None:
        return None
    toggle = f.metadata.get("flags", ("",))[0]
    if isinstance(f.default, bool) and "/" in toggle:
        return toggle.split("/")[0 if f.default else 1]
    return str(f.default)


def _offer(path: tuple[str, ...], f: Field, hint: Any, doc: str) -> Offered:
    """The typer parameter of field ``f`` (its annotation ``hint``, its docstring ``doc``)."""
    meta = f.metadata
    kinds = _types(hint)
    convert = _converter(meta, len(kinds) > 1)
    kind = str if "sep" in meta or len(kinds) > 1 else kinds[0]
    if meta.get("path"):
        kind = list[Path] if typing.get_origin(kind) is list else Path
    flags = meta.get("flags", ())
    name = _long_flag(f).lstrip("-").replace("-", "_")
    if meta.get("argument"):
        info = typer.Argument(help=doc)
        return Offered(path, _parameter(name, kind, info, inspect.Parameter.empty), convert)
    if "choices" in meta:  # read when the command line is built (a lens registered before)
        doc = f"{doc} One of: " + "; ".join(f"{k}: {v}" for k, v in meta["choices"]().items())
    shown = _shown_default(f)
    help_text = doc if shown is None else f"{doc}  [default: {shown}]"
    limits = {k: meta[k] for k in ("min", "max") if k in meta}
    info = typer.Option(*flags, help=help_text, **limits)
    required = f.default is MISSING and f.default_factory is MISSING
    default = inspect.Parameter.empty if required else None
    kind = kind if required else kind | None
    return Offered(path, _parameter(name, kind, info, default), convert)


def _parameter(name: str, kind: Any, info: Any, default: Any) -> inspect.Parameter:
    annotation = Annotated[kind, info]
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
    )


def offered(cls: type, skip: tuple[str, ...] = (), docs_from: type | None = None) -> list[Offered]:
    """The parameters of ``cls``'s fields, a nested config's fields in its place.

    Args:
        cls: The config dataclass.
        skip: Fields the command does not offer (``"generation.seed"`` for a nested one).
        docs_from: A dataclass whose same-named fields give the help and limits (the home of
            settings that ``cls`` holds flattened, as ``EntropyConfig`` holds ``LensSettings``).
    """
    hints = typing.get_type_hints(cls)
    unknown = sorted({s.partition(".")[0] for s in skip} - set(hints))
    if unknown:
        raise TypeError(f"{cls.__name__} has no field(s) {unknown} to skip")
    home = {f.name: f for f in fields(docs_from)} if docs_from else {}
    found = []
    for f in fields(cls):
        if f.name in skip:
            continue
        if f.metadata.get("parameters"):
            found += _parameter_options(f.name)
            continue
        if is_dataclass(hints[f.name]):
            inner = tuple(s.partition(".")[2] for s in skip if s.startswith(f"{f.name}."))
            found += [
                Offered((f.name, *o.path), o.parameter, o.convert)
                for o in offered(hints[f.name], inner)
            ]
            continue
        owner, field = (docs_from, home[f.name]) if f.name in home else (cls, f)
        found.append(_offer((f.name,), field, hints[f.name], field_docs(owner)[f.name]))
    return found


def _parameter_options(name: str) -> list[Offered]:
    """One option per parameter of the statistics registry, into the dict field ``name``."""
    from ..statistics import parameters  # the registry: its parameters are the options

    found = []
    for key, p in parameters().items():
        limits = {k: v for k, v in (("min", p.min), ("max", p.max)) if v is not None}
        flag = "--" + key.replace("_", "-")
        info = typer.Option(flag, help=f"{p.help}  [default: {p.default}]", **limits)
        parameter = _parameter(key, float | None, info, None)
        found.append(Offered((name, key), parameter, lambda value: value))
    return found


def offers(cls: type, *, skip: tuple[str, ...] = (), docs_from: type | None = None):
    """Give a command the options of ``cls``'s fields (see :func:`offered`).

    The command's first parameter receives ``given``: the values the user set, as the keyword
    arguments of ``cls`` (a nested config's as a dict; see :func:`make`); its other parameters
    are its own options, declared as usual.
    """

    def decorate(func: Callable) -> Callable:
        options = offered(cls, skip, docs_from)
        own = list(inspect.signature(func, eval_str=True).parameters.values())[1:]
        names = [o.parameter.name for o in options] + [p.name for p in own]
        clash = sorted({name for name in names if names.count(name) > 1})
        if clash:  # a nested config's field named as its parent's needs its own flag
            raise TypeError(f"{func.__name__}: options {clash} are declared twice")

        def command(**kwargs):
            given: dict = {}
            for option in options:
                value = kwargs.pop(option.parameter.name)
                if value is not None:
                    *outer, name = option.path
                    place = given
                    for key in outer:
                        place = place.setdefault(key, {})
                    place[name] = option.convert(value)
            return func(given, **kwargs)

        command.__name__, command.__doc__ = func.__name__, func.__doc__
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        command.__signature__ = inspect.Signature([o.parameter for o in options] + own)
        return command

    return decorate


def make(cls: type, values: dict):
    """``cls`` with its defaults, replaced by ``values`` (a nested config's values as a dict)."""
    hints = typing.get_type_hints(cls)
    values = {
        name: make(hints[name], value)
        if isinstance(value, dict) and is_dataclass(hints[name])
        else value
        for name, value in values.items()
    }
    return cls(**values)
