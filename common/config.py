"""One config mechanism for every command: a typed dataclass, a JSON/TOML file, command-line flags.

    defaults (the dataclass)  <  base (e.g. a checkpoint's saved config)  <  --config FILE  <  flags

A command states its knobs once, as a dataclass whose fields carry their help text:

    @dataclass
    class ExportConfig:
        ckpt: str = field(metadata={"help": "run OUT_DIR or one ckpt/step_N dir"})   # no default: required
        out: str = field(default="export", metadata={"help": "where model.safetensors goes"})
        dtype: str = field(default="auto", metadata={"help": "weights dtype", "choices": ("auto", "fp32")})

    cfg = parse_cli(ExportConfig, argv, prog="python -m training.export", description=__doc__)

Flags (the spellings nanoGPT users type):

    --key=value  --key value         any field; a nested dataclass field by its dotted key (--model.n_layer=4)
    --flag  --no_flag  --no-flag     a bool field: bare means true, no_ means false (--flag=false works too)
    --steps=8,16  --steps 8 16       a list field: commas or several values; a repeated flag adds more
    --top_p=none                     an Optional field: none (or null) means None
    --config FILE                    a .json or .toml file of the same keys (nested tables for dotted keys)
    -h, --help                       every key with its default and help

Dashes in flag names read as underscores (--seq-lens is --seq_lens). Unknown keys are an error that lists
the known ones; a value that does not convert to its field's type is an error; a field without a default
is required. In files, values must already have the field's type (an int is fine for a float) and a key
that starts with "_" is a comment ("_comment": "..."). Nothing is ever exec'd (nanoGPT's configurator
is the habit this replaces).

Help text comes from `field(metadata={"help": ...})`, or else from the field's trailing `# comment` in the
class source (so the model's and the objective's dataclasses document their keys without a second copy).
`metadata={"choices": (...)}` restricts a field to those values.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import re
import sys
import textwrap
import tomllib
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

SCALAR_TYPES = (str, int, float, bool)
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
NONE_WORDS = ("none", "null")


def knob(default, help: str, **more):
    """A config field with its default and help text (and e.g. choices=(...)), in one line. A list
    default is copied for every instance (dataclasses refuse a shared mutable default)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **more})
    return field(default=default, metadata={"help": help, **more})


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()  # the default of a field that has none: it must be given


class ConfigError(ValueError):
    """A config mistake: the message says which key and what it accepts."""


@dataclass(frozen=True)
class Key:
    """One settable leaf of a config: its dotted name and what it accepts."""
    name: str
    type: type  # str | int | float | bool (of the elements, for a list)
    is_list: bool = False
    optional: bool = False  # None is allowed
    choices: Optional[tuple] = None
    default: Any = REQUIRED
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


# ----------------------------------------------------------------------------- what a dataclass accepts
def config_keys(cls) -> dict[str, Key]:
    """Every leaf of dataclass `cls` by dotted key, with the default it has in `cls`."""
    return _keys(cls, "", None)


def _keys(cls, prefix: str, instance) -> dict[str, Key]:
    out: dict[str, Key] = {}
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in fields(cls):
        hint = hints[f.name]
        default = getattr(instance, f.name) if instance is not None else _field_default(f)
        if is_dataclass(hint):
            out.update(_keys(hint, f"{prefix}{f.name}.", None if default is MISSING else default))
            continue
        typ, is_list, optional = _leaf_type(hint, f"{cls.__name__}.{f.name}")
        out[prefix + f.name] = Key(prefix + f.name, typ, is_list, optional, f.metadata.get("choices"),
                                   REQUIRED if default is MISSING else default,
                                   f.metadata.get("help") or comments.get(f.name, ""))
    return out


def _groups(cls, prefix: str = "") -> dict[str, str]:
    """Nested dataclass fields -> their help ({"model": "the backbone ..."})."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            out[prefix + f.name] = f.metadata.get("help") or comments.get(f.name, "")
            out.update(_groups(hints[f.name], f"{prefix}{f.name}."))
    return out


def _field_default(f):
    if f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def _leaf_type(hint, where: str) -> tuple[type, bool, bool]:
    """-> (scalar type, is a list, may be None) for str | int | float | bool, Optional[...] and list[...]."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{where}: a config field may be Optional[X] but no other union, got {hint}")
        hint, optional = args[0], True
    is_list = typing.get_origin(hint) is list
    if is_list:
        (hint,) = typing.get_args(hint) or (str,)
    if hint not in SCALAR_TYPES:
        raise TypeError(f"{where}: config fields are str, int, float, bool, Optional[...] or list[...] of them, "
                        f"or a nested dataclass; got {hint}")
    return hint, is_list, optional


def _field_comments(cls) -> dict[str, str]:
    """field name -> its trailing `# comment` in the class source ({} when the source is unavailable)."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in source.splitlines():
        m = re.match(r"\s+(\w+)\s*:", line)
        if m and "  # " in line:
            out.setdefault(m.group(1), line.split("  # ", 1)[1].strip())
    return out


# ----------------------------------------------------------------------------- values
def _words(typ: type) -> str:
    return "true/false" if typ is bool else typ.__name__


def _check_choice(value, key: Key, where: str):
    if key.choices is not None and value is not None:
        for v in (value if key.is_list else [value]):
            if v not in key.choices:
                raise ConfigError(f"{where}={v!r}: expected one of {' | '.join(map(str, key.choices))}")
    return value


def _convert(text: str, key: Key, flag: str):
    """One command-line string to the key's (element) type."""
    low = text.lower()
    if key.optional and low in NONE_WORDS:
        return None
    if key.type is bool:
        if low in TRUE_WORDS:
            return True
        if low in FALSE_WORDS:
            return False
    elif key.type is str:
        return text
    else:
        with contextlib.suppress(ValueError):
            return key.type(text)
    raise ConfigError(f"--{flag}: expected {_words(key.type)}, got {text!r}")


def _checked(value, key: Key, where: str):
    """A value from a file (or already converted): it must have the key's type; an int is fine for a float."""
    def scalar(v):
        if key.type is float and isinstance(v, int) and not isinstance(v, bool):
            return float(v)
        if not isinstance(v, key.type) or (key.type is not bool and isinstance(v, bool)):
            raise ConfigError(f"config key {where}: expected {_words(key.type)}"
                              f"{' list' if key.is_list else ''}, got {value!r}")
        return v

    if value is None and key.optional:
        return None
    if key.is_list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {where}: expected a list of {_words(key.type)}, got {value!r}")
        value = [scalar(v) for v in value]
    else:
        value = scalar(value)
    return _check_choice(value, key, where)


# ----------------------------------------------------------------------------- files
def read_config_file(path) -> dict:
    """A .toml or .json config file as a (nested) dict; keys that start with "_" are comments and dropped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): save it "
                          f"as UTF-8 (JSON and TOML files are UTF-8)") from None
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of config keys (e.g. {{\"max_iters\": 100}}; --help lists them), "
                          f"not {type(data).__name__}")
    return _without_comments(data)


def _without_comments(d: dict) -> dict:
    return {k: _without_comments(v) if isinstance(v, dict) else v for k, v in d.items() if not k.startswith("_")}


def flatten(d: Mapping, prefix: str = "") -> dict:
    """{"model": {"n_layer": 4}} -> {"model.n_layer": 4}"""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def nest(flat: Mapping) -> dict:
    """{"model.n_layer": 4} -> {"model": {"n_layer": 4}}"""
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return out


# ----------------------------------------------------------------------------- flags
def parse_flags(cls, argv: Sequence[str], *, aliases: Optional[Mapping[str, str]] = None,
                allow_unknown: bool = False) -> tuple[dict[str, Any], list[str]]:
    """['--model.n_layer=4', '--max_iters', '100', '--compile'] -> ({'model.n_layer': 4, ...}, rest).

    Values are converted to each key's type. `aliases` maps a flag name to a dotted key. With
    allow_unknown, flags that are not keys (and the value after one, if any) are returned in `rest`
    instead of being an error."""
    keys = config_keys(cls)
    aliases = aliases or {}
    out: dict[str, Any] = {}
    rest: list[str] = []
    argv = list(argv)
    i = 0

    def takes_value(j: int) -> bool:
        return j < len(argv) and not argv[j].startswith("--")

    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if allow_unknown:
                rest.append(arg)
                continue
            raise ConfigError(f"unexpected argument {arg!r}: flags look like --key=value or --key value")
        spelled, eq, text = arg[2:].partition("=")
        name = spelled.replace("-", "_")
        negated = False
        if name in aliases:
            name = aliases[name]
        elif name not in keys and name.startswith("no_") and getattr(keys.get(name[3:]), "type", None) is bool:
            name, negated = name[3:], True
        key = keys.get(name)
        if key is None:
            if not allow_unknown:
                raise ConfigError(f"unknown config key --{spelled}; known keys: {', '.join(keys)}")
            rest.append(arg)
            if not eq and takes_value(i):
                rest.append(argv[i])
                i += 1
            continue
        if negated:
            if eq:
                raise ConfigError(f"--{spelled} takes no value (it sets {name} to false)")
            out[name] = False
        elif key.is_list:
            texts = [text] if eq else []
            while not eq and takes_value(i):
                texts.append(argv[i])
                i += 1
            if not eq and not texts:
                raise ConfigError(f"--{spelled} needs a value (a comma list)")
            items = [_convert(t, key, name) for t in ",".join(texts).split(",") if t.strip()]
            out[name] = (out.get(name) or []) + items
        elif key.type is bool and not eq:
            # bare --flag is true; --flag false / --flag 0 also read (a following bool word is its value)
            if takes_value(i) and argv[i].lower() in TRUE_WORDS + FALSE_WORDS:
                out[name] = _convert(argv[i], key, name)
                i += 1
            else:
                out[name] = True
        else:
            if not eq:
                if not takes_value(i):
                    raise ConfigError(f"--{spelled} needs a value")
                text = argv[i]
                i += 1
            out[name] = _convert(text, key, name)
        _check_choice(out[name], key, f"--{name}")
    return out, rest


# ----------------------------------------------------------------------------- building
def build(cls: type[T], values: Mapping, where: str = "") -> T:
    """Dataclass `cls` from a nested dict on top of its defaults; unknown keys are an error listing the
    known ones, values are type-checked, required fields must be present."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {[where + k for k in unknown]} in {cls.__name__}; known keys: "
                          f"{', '.join(where + k for k in config_keys(cls))}")
    hints = typing.get_type_hints(cls)
    keys = None
    kwargs = {}
    for name, f in known.items():
        sub = hints[name] if is_dataclass(hints[name]) else None
        if sub is not None:
            given = values.get(name, {})
            if not isinstance(given, Mapping):
                example = next(iter(config_keys(sub)), "KEY")
                raise ConfigError(f"config key {where}{name} is a table of {sub.__name__} keys, got {given!r}: "
                                  f"set its keys one by one, e.g. {{\"{name}\": {{\"{example}\": ...}}}} in a file or "
                                  f"--{where}{name}.{example}=... as a flag (--help lists them)")
            default = _field_default(f)
            base = asdict(default) if default is not MISSING else {}
            kwargs[name] = build(sub, {**base, **given}, f"{where}{name}.")
        elif name in values:
            keys = keys or config_keys(cls)
            kwargs[name] = _checked(values[name], keys[name], where + name)
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(f"--{where}{name} is required")
    return cls(**kwargs)


class Loaded(NamedTuple):
    config: Any
    explicit: set  # dotted keys stated by the base, the file or a flag (not left at their default)
    rest: list  # flags that are not keys (only with allow_unknown)


def load(cls: type[T], argv: Sequence[str] = (), *, config_file=None, base: Optional[Mapping] = None,
         aliases: Optional[Mapping[str, str]] = None, config_flag: Optional[str] = "config",
         allow_unknown: bool = False) -> Loaded:
    """defaults < base < config file (`--config FILE` in argv, else config_file) < the flags in argv.

    config_flag=None when the command has no config file of its own (or a field named config)."""
    argv = list(argv)
    if config_flag:
        argv, flag_file = _take_option(argv, config_flag)
        config_file = flag_file or config_file
    values: dict = {}
    for layer in (base or {}, read_config_file(config_file) if config_file else {}):
        values.update({(aliases or {}).get(k, k): v for k, v in flatten(layer).items()})
    flag_values, rest = parse_flags(cls, argv, aliases=aliases, allow_unknown=allow_unknown)
    values.update(flag_values)
    return Loaded(build(cls, nest(values)), set(values), rest)


def _take_option(argv: list[str], name: str) -> tuple[list[str], Optional[str]]:
    """Remove --name FILE / --name=FILE from argv; the last one wins."""
    left, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{name}":
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise ConfigError(f"--{name} needs a file (.json or .toml)")
            value, i = argv[i + 1], i + 2
            continue
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        else:
            left.append(arg)
        i += 1
    return left, value


# ----------------------------------------------------------------------------- help and the CLI
def _show(value) -> str:
    """A default as one would type it on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value) if value else '""'
    if isinstance(value, str) and not re.fullmatch(r"[\w./:+@-]+", value):
        return json.dumps(value)
    return str(value)


def help_text(cls, width: int = 100) -> str:
    """Every key with its default and help, one per line (the nested groups introduced by a header)."""
    keys, groups = config_keys(cls), _groups(cls)
    heads = {}
    for key in keys:  # a group's header goes before its first key
        parts = key.split(".")
        for depth in range(1, len(parts)):
            group = ".".join(parts[:depth])
            heads.setdefault(group, key)
    left = {k: f"  --{k}" + (" (required)" if key.required else f"={_show(key.default)}") for k, key in keys.items()}
    col = min(max(map(len, left.values()), default=0) + 3, 40)
    lines = []
    for k, key in keys.items():
        for group, first in heads.items():
            if first == k:
                lines.append(f"  --{group}.*" + (f"   {groups[group]}" if groups.get(group) else ""))
        notes = [key.help] if key.help else []
        if key.choices is not None:
            notes.append(f"(one of: {' | '.join(map(str, key.choices))})")
        if key.is_list:
            notes.append("(a comma list)")
        if key.type is bool and key.default is True:
            notes.append(f"(--no_{k}: false)")
        head = left[k].ljust(col) if notes else left[k]
        if notes and len(left[k]) > col - 2:  # a long default: its help starts on the next line
            lines.append(left[k])
            head = " " * col
        wrapped = textwrap.wrap(" ".join(notes), max(width - col, 40)) or [""]
        lines.append((head + wrapped[0]).rstrip())
        lines += [" " * col + w for w in wrapped[1:]]
    return "\n".join(lines)


def usage(cls, prog: str, description: str = "", epilog: str = "", config_flag: Optional[str] = "config") -> str:
    config = f"[--{config_flag} FILE.json|.toml] " if config_flag else ""
    parts = [f"usage: {prog} {config}[--key=value | --key value | --flag | --no_flag ...]"]
    if description:
        parts.append(description.strip("\n"))
    parts.append("keys (default, then meaning):\n" + help_text(cls))
    if epilog:
        parts.append(epilog.strip("\n"))
    return "\n\n".join(parts) + "\n"


def wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


@contextlib.contextmanager
def exit_on_config_error(prog: str) -> Iterator[None]:
    """A config mistake ends the command with its message and exit status 2, as argparse does."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        print(f"usage: {prog} [--key=value ...]  (--help lists every key)\n{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def run_or_exit(run: Callable[[T], R], args: T, errors: tuple = (ValueError, FileNotFoundError, RuntimeError)) -> R:
    """run(args) for a command's main: a bad input (one of `errors`, whose message names the fix) ends the
    command with "error: <message>" and exit status 2, without a traceback."""
    try:
        return run(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def parse_cli(cls: type[T], argv: Optional[Sequence[str]] = None, *, prog: str, description: str = "",
              epilog: str = "", aliases: Optional[Mapping[str, str]] = None,
              config_flag: Optional[str] = "config") -> T:
    """The command line of one command: --help prints every key and exits 0; a mistake exits 2 with
    its message; otherwise the config (defaults < --config FILE < flags)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if wants_help(argv):
        print(usage(cls, prog, description, epilog, config_flag), end="")
        raise SystemExit(0)
    with exit_on_config_error(prog):
        return load(cls, argv, aliases=aliases, config_flag=config_flag).config
