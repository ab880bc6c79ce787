"""One way to save and load a tree of config dataclasses as TOML.

Every config in step-infra is a small frozen dataclass, and bigger ones contain smaller ones
(a job's config holds its data, VAE, strategy, encoder-server and elastic configs). A run
directory keeps the whole tree as ``config.toml``; a plan from the emulator is TOML too.
Conversion between dataclasses and plain values is msgspec's (it handles nested dataclasses,
tuples, literals and optionals, and reports where a value has the wrong type); writing is
tomli-w's, reading the standard library's. What is written here is only what neither does:

* TOML has no null: ``None`` fields are left out when saving and come back as their default
  (so an optional field's default must be ``None`` for a round trip to hold; it is checked);
* unknown keys are an error naming the key, its table and the keys expected, because a
  silently ignored key (a typo, or a setting this version cannot honour) is worse than none;
* paths are written as strings.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import tomli_w

T = TypeVar("T")


def _enc(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    raise NotImplementedError(f"cannot write {type(obj).__name__} {obj!r} to TOML")


def _dec(typ: type, obj: Any) -> Any:
    if typ is Path and isinstance(obj, str):
        return Path(obj)
    raise TypeError(f"cannot read {obj!r} as {getattr(typ, '__name__', typ)}")


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_drop_none(v) for v in value]
    return value


def to_builtins(obj: Any) -> dict[str, Any]:
    """The config tree as plain dicts, lists and scalars (``None`` fields left out)."""
    out = _drop_none(msgspec.to_builtins(obj, enc_hook=_enc))
    if not isinstance(out, dict):
        raise TypeError(f"expected a dataclass config, got {type(obj).__name__}")
    return out


def dumps(obj: Any, *, header: str = "") -> str:
    """TOML text of a config tree; ``header`` becomes leading ``#`` comment lines."""
    text = tomli_w.dumps(to_builtins(obj))
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    return "\n".join(lines) + ("\n\n" if lines else "") + text


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside a field's annotation (``X``, ``X | None``), if any."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        found = [
            a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)
        ]
        return found[0] if len(found) == 1 else None
    return None


def check_keys(doc: Mapping[str, Any], cls: type, where: str = "") -> None:
    """Raise ``ValueError`` for a key ``cls`` (or a nested config) does not have."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    for key, value in doc.items():
        if key not in names:
            table = f"[{where}]" if where else "the top level"
            raise ValueError(f"unknown key {key!r} in {table}; expected one of {sorted(names)}")
        inner = _dataclass_of(hints[key])
        if inner is not None and isinstance(value, Mapping):
            check_keys(value, inner, f"{where}.{key}" if where else key)


def from_builtins(doc: Mapping[str, Any], cls: type[T], *, source: str = "config") -> T:
    """Build ``cls`` from plain values; wrong keys or types raise ``ValueError`` naming them."""
    check_keys(doc, cls)
    try:
        return msgspec.convert(dict(doc), cls, dec_hook=_dec)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{source}: {exc}") from exc


def loads(text: str, cls: type[T], *, source: str = "config") -> T:
    """Parse TOML text into ``cls``."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{source}: not valid TOML ({exc})") from exc
    return from_builtins(doc, cls, source=source)


def save(obj: Any, path: str | Path, *, header: str = "") -> Path:
    """Write ``obj`` to ``path`` atomically (a reader never sees half a file)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(dumps(obj, header=header))
    tmp.replace(out)
    return out


def load(path: str | Path, cls: type[T]) -> T:
    """Read ``cls`` from the TOML file at ``path``."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist")
    return loads(p.read_text(), cls, source=str(p))


def load_tables(path: str | Path, tables: Mapping[str, type]) -> dict[str, Any]:
    """Some tables (or top-level values) of a TOML file, each converted to its type; the
    file's other keys are left to whoever owns them. A missing table takes its type's
    defaults; a missing scalar is an error."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p} does not exist")
    doc = tomllib.loads(p.read_text())
    out: dict[str, Any] = {}
    for name, typ in tables.items():
        if dataclasses.is_dataclass(typ):
            value = doc.get(name, {})
            if not isinstance(value, Mapping):
                raise ValueError(f"{p}: [{name}] must be a table, got {value!r}")
            out[name] = from_builtins(value, typ, source=f"{p} [{name}]")
        elif name in doc:
            try:
                out[name] = msgspec.convert(doc[name], typ, dec_hook=_dec)
            except msgspec.ValidationError as exc:
                raise ValueError(f"{p}: {name}: {exc}") from exc
        else:
            raise ValueError(f"{p}: missing key {name!r}")
    return out
