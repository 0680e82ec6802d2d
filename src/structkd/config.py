"""YAML configuration derived from the API's own types: schemas, loading, overrides, dumping.

A *schema* is a dataclass whose fields are sections, each a dataclass: either an option type of
the API itself (used as it is) or one derived here from a callable's keyword parameters or a
dataclass's fields (:func:`section_from_signature`, :func:`section_from_dataclass`), so a name,
a type and a default are written once, in the API, and the YAML keys follow them.

Loading (:func:`load`) layers a base mapping, a YAML file and ``key.path=value`` overrides onto
the schema's defaults with `jsonargparse <https://jsonargparse.readthedocs.io>`_ (the library
LightningCLI uses): it parses the YAML values, merges, and checks every value against its
annotation (``int`` is not ``float``, ``Literal`` choices, unions, lists of a type). Building the
sections then runs the API types' own value checks (``__post_init__``). Every error is one
``ValueError`` naming the key, the value and what was expected; unknown keys name the valid ones.

This module knows nothing of structkd's sections; the engine composes its ``Config`` from the API.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
import typing
import warnings
from collections import abc
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from .checks import type_text

__all__ = [
    "ConfigError",
    "compose",
    "dump",
    "load",
    "parse_flags",
    "parse_override",
    "part",
    "section_from_dataclass",
    "section_from_signature",
    "to_dict",
    "type_text",
]

T = TypeVar("T")
_SCALARS = (bool, int, float, str, type(None))


class ConfigError(ValueError):
    """A configuration that does not fit its schema (the message names key and value)."""


# ---- deriving sections ------------------------------------------------------------------------
def representable(tp: Any) -> Any | None:
    """``tp`` reduced to what a YAML value can be (scalars, Literal, lists, tuples, mappings),
    or None when nothing of it can (a module, a dtype, a callable). Union members that YAML
    cannot hold are dropped: ``str | DistillMethod`` becomes ``str``; paths become ``str``."""
    if tp is Any or tp in _SCALARS:
        return tp
    if tp in (Path, os.PathLike):
        return str
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        return tp
    if origin in (typing.Union, types.UnionType):
        kept = []
        for a in args:
            r = representable(a)
            if r is not None and r not in kept:
                kept.append(r)
        if not kept or kept == [type(None)]:
            return None
        return kept[0] if len(kept) == 1 else typing.Union[tuple(kept)]  # noqa: UP007
    if origin in (list, tuple, abc.Sequence):
        if origin is tuple and args and args[-1] is not Ellipsis:
            items = [representable(a) for a in args]
            return None if any(i is None for i in items) else tuple[tuple(items)]
        item = representable(args[0]) if args else Any
        return None if item is None else list[item]
    if origin in (dict, abc.Mapping):
        value = representable(args[1]) if len(args) == 2 else Any
        return None if value is None else dict[str, value]
    if dataclasses.is_dataclass(tp):
        return tp
    return None


def _field(name: str, tp: Any, default: Any) -> tuple[str, Any, Any]:
    if isinstance(default, list | dict | set):
        return name, tp, dataclasses.field(default_factory=lambda d=default: type(d)(d))
    if isinstance(default, tuple):
        return name, tp, dataclasses.field(default=default)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return name, tp, dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d))
    return name, tp, dataclasses.field(default=default)


def section_from_signature(
    fn: Callable[..., Any], name: str, *, skip: Sequence[str] = (), doc: str | None = None,
    defaults: Mapping[str, Any] | None = None, var_keyword: str | None = None,
    extra: Sequence[tuple[str, Any, Any]] = (), check: Callable[[Any], None] | None = None,
) -> type:
    """A dataclass with one field per keyword parameter of ``fn`` (type and default from its
    signature; ``defaults`` replaces some defaults). ``var_keyword``: the field that holds
    ``**kwargs`` as a mapping. ``extra``: ``(name, type, default)`` fields the signature lacks.
    Parameters without a default, or whose type YAML cannot hold, are left out unless listed
    in ``defaults``. ``check(section)`` runs when the section is built (the API's own value
    checks, e.g. constructing the object the section describes)."""
    hints = typing.get_type_hints(fn)
    fields = []
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.name == "self" or p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            if var_keyword:
                fields.append(_field(var_keyword, dict[str, Any], {}))
            continue
        tp = representable(hints.get(p.name, Any))
        default = (defaults or {}).get(p.name, p.default)
        if tp is None or default is inspect.Parameter.empty:
            continue
        fields.append(_field(p.name, _optional(tp) if default is None else tp, default))
    fields += [_field(*f) for f in extra]
    return _make(name, fields, doc or f"Keyword options of ``{fn.__qualname__}``.", check)


def section_from_dataclass(
    cls: type, name: str, *, skip: Sequence[str] = (), doc: str | None = None,
    defaults: Mapping[str, Any] | None = None, check: Callable[[Any], None] | None = None,
) -> type:
    """A dataclass with the fields of dataclass ``cls`` (minus ``skip``; ``defaults`` replaces
    some defaults): the schema of a section that mirrors an API type field by field.
    ``check`` as in :func:`section_from_signature`."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.name in (defaults or {}):
            default = defaults[f.name]  # type: ignore[index]
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = f.default
        tp = representable(hints[f.name])
        if tp is None:
            raise TypeError(f"{cls.__name__}.{f.name}: type {hints[f.name]} has no YAML form")
        fields.append(_field(f.name, tp, default))
    return _make(name, fields, doc or f"The fields of ``{cls.__qualname__}``.", check)


def compose(name: str, *parts: type, doc: str | None = None,
            check: Callable[[Any], None] | None = None) -> type:
    """One section holding the fields of several dataclasses (names must not repeat); building
    it builds each part, so every part's own checks run, then ``check(section)`` (checks
    across parts). :func:`part` gets a part back."""
    fields: list[tuple[str, Any, Any]] = []
    seen: set[str] = set()
    for cls in parts:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                raise TypeError(f"compose({name}): field {f.name!r} appears twice")
            seen.add(f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            fields.append(_field(f.name, hints[f.name], default))

    def check_all(section: Any) -> None:
        for cls in parts:
            part(section, cls)
        if check is not None:
            check(section)

    return _make(name, fields, doc or f"The fields of {', '.join(c.__name__ for c in parts)}.",
                 check_all)


def part(section: Any, cls: type[T]) -> T:
    """The ``cls`` object made of the same-named fields of ``section``."""
    return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


def _optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if tp is Any or type(None) in args:
        return tp
    return typing.Optional[tp]  # noqa: UP045


def _make(name: str, fields: list[tuple[str, Any, Any]], doc: str,
          check: Callable[[Any], None] | None = None) -> type:
    namespace = {"__post_init__": lambda self: check(self)} if check is not None else {}
    cls = dataclasses.make_dataclass(name, fields, namespace=namespace)
    cls.__doc__ = doc
    return cls


# ---- loading ----------------------------------------------------------------------------------
def _fields(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_keys(schema: type, doc: Any, where: str, renamed: Mapping[str, str]) -> None:
    """Unknown keys (at any depth of dataclass sections) and sections that are not mappings."""
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where or 'config'}={doc!r}: expected a mapping")
    hints = _fields(schema)
    for key, value in doc.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in hints:
            hint = f" ('{path}' is now '{renamed[path]}')" if path in renamed else ""
            raise ConfigError(f"unknown config key '{path}'{hint}; expected one of "
                              f"{list(hints)}")
        if dataclasses.is_dataclass(hints[key]):
            _check_keys(hints[key], value, path, renamed)


def _annotation(schema: type, key: str) -> Any:
    tp: Any = schema
    for part in key.split("."):
        hints = _fields(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _value(doc: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(doc, Mapping) or part not in doc:
            return _MISSING
        doc = doc[part]
    return doc


_MISSING = object()


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> ``("a.b", value)`` with the value read as YAML (0.1, true, null, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: cannot parse value: {e}") from None
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _parser(schema: type):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, default_env=False, env_prefix=False,
                            allow_abbrev=False)  # no silent prefix match of a renamed key
    parser.add_class_arguments(schema, fail_untyped=True, sub_configs=False)
    return parser


def _explain(e: Exception, schema: type, doc: Mapping[str, Any]) -> str:
    """One line for a jsonargparse error: ``key=value: expected <type>``."""
    text = str(e)
    m = re.search(r'Parser key "([^"]+)"', text) or re.search(r"key[s]? \"?([\w.]+)", text)
    if not m:
        return " ".join(text.split())[:400]
    key = m.group(1)
    value = _value(doc, key)
    tp = _annotation(schema, key)
    shown = "" if value is _MISSING else f"={value!r}"
    expected = type_text(tp) if tp is not None else " ".join(text.split())[:200]
    return f"{key}{shown}: expected {expected}"


def parse_flags(schema: type, argv: Sequence[str], *,
                renamed: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Command-line flags that are keys of ``schema`` (``--optim.lr 0.02``,
    ``--trainer.devices=2``, ``--distill.options.window_size 7``) as a nested mapping of the
    given keys only, each value parsed by its annotation (an ``int`` key takes ``2``, not
    ``two``); a flag that is no key names the valid keys of its section."""
    parser = _parser(schema)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return parser.parse_args(list(argv), defaults=False).as_dict()
        except Exception as e:  # jsonargparse's ArgumentError
            for token in argv:
                key = token.split("=", 1)[0].removeprefix("--")
                if token.startswith("--") and _annotation(schema, key) is None and \
                        not _under_mapping(schema, key):
                    try:
                        _check_keys(schema, _nest(key, None), "", renamed or {})
                    except ConfigError as unknown:
                        raise ConfigError(f"{token.split('=', 1)[0]}: {unknown}") from None
                    break
                if not token.startswith("-") and token is argv[0]:
                    raise ConfigError(f"unexpected argument {token!r}; expected config keys "
                                      "as flags, e.g. --optim.lr 0.02") from None
            flag = re.search(r'Parser key "([^"]+)"', str(e))
            doc = {}
            if flag is not None:  # the value given to that key, for the message
                given = [t.split("=", 1)[1] if "=" in t else (argv[i + 1] if i + 1 < len(argv)
                                                              else None)
                         for i, t in enumerate(argv)
                         if t.split("=", 1)[0] == f"--{flag.group(1)}"]
                if given:
                    doc = _nest(flag.group(1), given[-1])
            raise ConfigError(f"--{_explain(e, schema, doc)}") from None


def _under_mapping(schema: type, key: str) -> bool:
    """Whether ``key`` lies inside a free mapping field (``distill.options.window_size``)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        tp = _annotation(schema, ".".join(parts[:i]))
        if tp is not None and (typing.get_origin(tp) in (dict, abc.Mapping) or tp is dict):
            return True
    return False


def load(
    schema: type[T], path: str | os.PathLike | None = None,
    overrides: Sequence[str | Mapping[str, Any]] = (), *,
    base: Mapping[str, Any] | None = None, renamed: Mapping[str, str] | None = None,
) -> T:
    """An instance of ``schema``: its defaults, then ``base``, then the YAML file at ``path``,
    then ``overrides``, later ones winning: each a ``section.key=value`` text (the value read
    as YAML) or a nested mapping of values as they are (e.g. from :func:`parse_flags`)."""
    renamed = renamed or {}
    documents: list[tuple[str, dict[str, Any]]] = []
    if base:
        documents.append(("", dict(base)))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        documents.append((f"{path}: ", data))
    for item in overrides:
        if isinstance(item, Mapping):
            documents.append(("", dict(item)))
        else:
            key, value = parse_override(item)
            documents.append(("", _nest(key, value)))
    parser = _parser(schema)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jsonargparse's deprecation notices of its own API
        ns = parser.get_defaults()
        for prefix, doc in documents:
            try:
                _check_keys(schema, doc, "", renamed)
                ns = parser.parse_object(doc, cfg_base=ns, defaults=False)
            except ConfigError as e:
                raise ConfigError(f"{prefix}{e}") from None
            except Exception as e:  # jsonargparse's ArgumentError / TypeError / ValueError
                raise ConfigError(f"{prefix}{_explain(e, schema, doc)}") from None
        return _build(schema, ns.as_dict())


def _build(schema: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """Instantiate ``schema`` from plain values, sections first, so each API type's own checks
    run; their messages (``name=value; expected ...``) get the section's key path."""
    hints = _fields(schema)
    kwargs = {}
    for key, value in values.items():
        tp = hints[key]
        path = f"{where}.{key}" if where else key
        kwargs[key] = _build(tp, value, path) if dataclasses.is_dataclass(tp) and isinstance(
            value, Mapping) else value
    try:
        return schema(**kwargs)
    except (ValueError, TypeError) as e:
        message = str(e)
        names = [f.name for f in dataclasses.fields(schema)]
        if where and f"{where}." in message:
            pass  # the message names its keys already
        elif where and re.match(rf"({'|'.join(map(re.escape, names))})\b", message):
            message = f"{where}.{message}"
        elif where:
            message = f"{where}: {message}"
        raise ConfigError(message) from None


def to_dict(obj: Any) -> Any:
    """A config object as plain YAML-able data (dataclasses to mappings, tuples to lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump(obj: Any) -> str:
    """YAML of a config object, keys in the schema's order."""
    return yaml.safe_dump(to_dict(obj), sort_keys=False)
