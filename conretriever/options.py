"""Options: every command's settings are one typed dataclass, parsed one way.

A command says what it accepts as a dataclass (``EvalSettings``, ``TrainSettings``, ...). This
module turns the dataclass into a command line and turns a command line, plus an optional YAML
file, back into a validated instance. The dataclass is the only place a default is written:
the command line, Python callers, scripts and saved runs all read the same ones.

* **Flags.** One per field, named like it: ``--batch_size 64``. The dashed spelling
  (``--batch-size``) is an alias of every flag, so both styles work in every command. A bool takes
  ``--name true|false``, ``--name`` alone (true) and ``--no_name`` / ``--no-name`` (false).
* **Sections.** A field whose type is itself a dataclass is a section (``model.lora``): its
  fields are flags too, optionally prefixed (``--lora_r`` sets ``model.lora.r``). Flat names are
  unique across the whole tree (checked when the parser is built), so a flag is never ambiguous.
* **YAML.** ``--config FILE`` (``--config_file`` where a setting is called ``config``) is a mapping
  of sections and/or flat names at any depth; flags override it. An unknown key is an error naming
  the file, the key and the closest known one.
* **Checks.** Every value is checked against its field's type (numbers must be finite), its
  ``choices`` (or a ``Literal`` type) and its bounds (``ge``, ``gt``, ``le``); a dataclass may add
  cross-field checks in a ``validate()`` method. Each problem is a :class:`ConfigError` naming the
  flag (or ``file: key``), the value given and what is allowed.
* **Lists and commas.** A list option takes its items space-separated (``--tasks a b``) or, in
  YAML, as a list. What a comma inside one item means is decided per option, never guessed
  from the value (``opt(commas=...)``), because ``--bitext_pairs English-French,German-English``
  read as ONE item made one task whose target language was "French,German-English":

  - ``"split"``: a comma separates items too (``--fields query,positive``). The default for
    enumerated lists (``choices``) and lists of numbers, which cannot hold a comma; declared for
    lists of names that cannot either (MTEB task names, language pairs);
  - ``"path"``: never split, since a comma is a legal character in a file name; an item with a
    comma that names no existing file or folder is refused, naming the flag and showing the
    space-separated form. The default for lists of paths (``list[Path]``);
  - ``"keep"``: free text, taken as given (declared where a comma is part of a legitimate
    value);
  - any other list of strings refuses a comma in an item (``"refuse"``), so a new option cannot
    fall into the trap silently: it must declare one of the above.
* **Help.** ``conretriever <command> --help`` prints the command's name and one line per option
  with its default and allowed values.

Declare a field's extras with :func:`opt`::

    @dataclass
    class EvalSettings:
        model: str = opt(help="model spec")                       # required: no default
        batch_size: int = opt(256, ge=1, help="texts per forward")
        engine: str = opt("native", choices=("native", "mteb"))
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path

import yaml

from conretriever.errors import ConfigError

_NONE_WORDS = ("none", "null")
_COMMA_RULES = ("split", "path", "keep", "refuse")
_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


# Every command names what it writes ``--output`` (a file or a folder: its help says which); the
# spellings commands used before (``--out``, ``--output_dir``, ``--out_dir``) stay accepted.
OUTPUT_ALIASES = ("out", "output_dir", "out_dir")


def output_opt(default=MISSING, *, help: str, **meta):  # noqa: A002 - argparse's name for it
    """The ``output`` field of a command: :func:`opt` with the old spellings as aliases."""
    return opt(default, aliases=OUTPUT_ALIASES, help=help, **meta)


def opt(
    default=MISSING,
    *,
    default_factory=MISSING,
    help: str = "",  # noqa: A002 - argparse's name for it
    choices: tuple | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    aliases: tuple[str, ...] = (),
    positional: bool = False,
    prefix: str = "",
    allow_nan: bool = False,
    metavar: str | None = None,
    required: bool = False,
    commas: str | None = None,
):
    """A dataclass field with command-line extras (see the module docstring).

    ``prefix`` applies to a section field: its fields' flags get it (``lora_``). ``aliases``
    are extra flag names (without dashes). ``positional`` makes a list field the command's
    positional arguments. No default, or ``required=True`` (a default that Python callers may
    rely on, None say, that the command line must not), makes the option required there.
    ``commas``: for a list, what a comma inside an item means (``split``, ``path``, ``keep``,
    ``refuse``; see the module docstring); None derives it from the item type."""
    if commas not in (None, *_COMMA_RULES):
        raise AssertionError(f"opt(commas={commas!r}): use one of {', '.join(_COMMA_RULES)}")
    meta = {
        "help": help,
        "choices": tuple(choices) if choices is not None else None,
        "ge": ge,
        "gt": gt,
        "le": le,
        "aliases": tuple(aliases),
        "positional": positional,
        "prefix": prefix,
        "allow_nan": allow_nan,
        "metavar": metavar,
        "required": required,
        "commas": commas,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=meta)


@dataclass(frozen=True)
class Option:
    """One leaf field of a settings tree."""

    name: str  # flat flag name, e.g. "lora_r"
    path: tuple[str, ...]  # attribute path from the root, e.g. ("model", "lora", "r")
    type: object  # the resolved annotation
    field: dataclasses.Field
    section_default: object = None  # the enclosing section's default instance, if it has one

    @property
    def meta(self) -> dict:
        return {**_DEFAULT_META, **dict(self.field.metadata)}

    @property
    def required(self) -> bool:
        no_default = self.field.default is MISSING and self.field.default_factory is MISSING
        return no_default or bool(self.meta["required"])

    def default(self):
        """A section's own default instance wins (``client: ClientSettings =
        opt(default_factory=lambda: ClientSettings(max_tokens=1024))`` defaults max_tokens to
        1024, not to the class's 2048); else the field's default."""
        if self.section_default is not None:
            return copy.deepcopy(getattr(self.section_default, self.field.name))
        if self.field.default_factory is not MISSING:
            return self.field.default_factory()
        return self.field.default

    @property
    def flag(self) -> str:
        return self.name if self.meta["positional"] else f"--{self.name}"


_DEFAULT_META = {
    "help": "",
    "choices": None,
    "ge": None,
    "gt": None,
    "le": None,
    "aliases": (),
    "positional": False,
    "prefix": "",
    "allow_nan": False,
    "metavar": None,
    "required": False,
    "commas": None,
}


# ----- the settings tree ------------------------------------------------------------------------
def _unwrap_optional(tp: object) -> tuple[object, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise AssertionError(f"option type {tp!r}: only X | None unions are supported")
        return rest[0], True
    return tp, False


def _is_section(tp: object) -> bool:
    base, _ = _unwrap_optional(tp)
    return isinstance(base, type) and dataclasses.is_dataclass(base)


def options(
    cls: type, prefix: str = "", path: tuple[str, ...] = (), default: object = None
) -> list[Option]:
    """Every leaf field of ``cls`` (sections flattened), in declaration order. ``default``: the
    instance the enclosing field defaults to, whose values are the leaves' defaults."""
    hints = typing.get_type_hints(cls)
    out: list[Option] = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if _is_section(tp):
            sub_prefix = prefix + dict(f.metadata).get("prefix", "")
            if default is not None:
                sub_default = getattr(default, f.name)
            elif f.default_factory is not MISSING:
                sub_default = f.default_factory()
            else:
                sub_default = None if f.default is MISSING else f.default
            out += options(_unwrap_optional(tp)[0], sub_prefix, (*path, f.name), sub_default)
        else:
            out.append(Option(prefix + f.name, (*path, f.name), tp, f, default))
    return out


def sections(cls: type, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], type]:
    """Section path -> dataclass, the root included (path ``()``)."""
    found = {path: cls}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if _is_section(hints[f.name]):
            found.update(sections(_unwrap_optional(hints[f.name])[0], (*path, f.name)))
    return found


def _index(cls: type) -> dict[str, Option]:
    index: dict[str, Option] = {}
    for o in options(cls):
        names = [o.name, *o.meta["aliases"]]
        for name in names:
            if name in index:
                raise AssertionError(f"{cls.__name__}: option name {name!r} is defined twice")
            index[name] = o
    return index


# ----- values -----------------------------------------------------------------------------------
def _type_name(tp: object) -> str:
    base, optional = _unwrap_optional(tp)
    if typing.get_origin(base) is typing.Literal:
        name = "|".join(str(a) for a in typing.get_args(base))
    elif typing.get_origin(base) is list:
        name = f"list of {_type_name(typing.get_args(base)[0])}"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or none" if optional else name


def _choices(o: Option) -> tuple | None:
    base, _ = _unwrap_optional(o.type)
    if typing.get_origin(base) is typing.Literal:
        return typing.get_args(base)
    return o.meta["choices"]


def _scalar(value: object, base: object, where: str) -> object:
    """One value (from YAML, a flag string or Python) converted to ``base``."""
    if base is bool:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if base is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if base is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if base is Path:
        if isinstance(value, str | Path):
            return Path(value)
        raise ConfigError(f"{where}: expected a path, got {value!r}")
    if typing.get_origin(base) is typing.Literal:
        allowed = typing.get_args(base)
        kind = type(allowed[0])
        if kind is str and isinstance(value, bool):  # YAML reads `resume: true` as a bool
            value = str(value).lower()
        converted = _scalar(value, kind, where)
        if converted not in allowed:
            raise ConfigError(
                f"{where}: {value!r} is not allowed; use one of {', '.join(map(str, allowed))}"
            )
        return converted
    raise AssertionError(f"{where}: unsupported option type {base!r}")


def comma_rule(o: Option) -> str | None:
    """What a comma inside one item of list option ``o`` means (the module docstring's
    rules); None for an option that is not a list."""
    base, _ = _unwrap_optional(o.type)
    if typing.get_origin(base) is not list:
        return None
    if o.meta["commas"] is not None:
        return o.meta["commas"]
    (item,) = typing.get_args(base)
    if _choices(o) is not None or item in (int, float):
        return "split"
    if item is Path:
        return "path"
    return "refuse"


def _commas(items: list, rule: str, where: str) -> list:
    """List items after the comma rule ``rule``: split, or checked (see :func:`comma_rule`)."""
    if rule == "split":  # "--fields query,positive" == "--fields query positive"
        return [p.strip() for v in items for p in str(v).split(",") if p.strip()]
    for v in items:
        if not isinstance(v, str) or "," not in v or rule == "keep":
            continue
        if rule == "path" and Path(v).expanduser().exists():
            continue  # a real file or folder whose name holds a comma
        spaced = " ".join(p.strip() for p in v.split(",") if p.strip())
        raise ConfigError(
            f"{where}: {v!r} holds a comma; give several items separated by spaces "
            f"({where.split(':')[-1].strip()} {spaced})"
            + (", or a path that exists" if rule == "path" else "")
        )
    return items


def convert(value: object, tp: object, where: str, commas: str | None = None) -> object:
    """``value`` checked and converted to the annotation ``tp`` (see the module docstring);
    ``commas``: a list's rule for a comma inside one item (:func:`comma_rule`; None: keep)."""
    base, optional = _unwrap_optional(tp)
    if value is None or (
        optional and isinstance(value, str) and value.strip().lower() in _NONE_WORDS
    ):
        if optional:
            return None
        raise ConfigError(f"{where}: a value is required (none is not allowed)")
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        items = value if isinstance(value, list | tuple) else [value]
        items = _commas(list(items), commas or "keep", where)
        return [convert(v, item, f"{where}[{i}]") for i, v in enumerate(items)]
    return _scalar(value, base, where)


def _check(o: Option, value: object, where: str) -> None:
    """Choices and bounds of one converted value."""
    if value is None:
        return
    for item in value if isinstance(value, list) else [value]:
        choices = _choices(o)
        if choices is not None and item not in choices:
            raise ConfigError(
                f"{where}: {item!r} is not allowed; use one of {', '.join(map(str, choices))}"
            )
        if isinstance(item, float) and not math.isfinite(item) and not o.meta["allow_nan"]:
            raise ConfigError(f"{where}: must be a finite number, got {item!r}")
        if isinstance(item, int | float) and not isinstance(item, bool):
            m = o.meta
            if m["ge"] is not None and not item >= m["ge"]:
                raise ConfigError(f"{where}: must be >= {m['ge']}, got {item!r}")
            if m["gt"] is not None and not item > m["gt"]:
                raise ConfigError(f"{where}: must be > {m['gt']}, got {item!r}")
            if m["le"] is not None and not item <= m["le"]:
                raise ConfigError(f"{where}: must be <= {m['le']}, got {item!r}")


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----- YAML -------------------------------------------------------------------------------------
def load_yaml(path: str | Path, what: str = "config"):
    """The plain YAML value in ``path`` (``yaml.safe_load``); every failure is one
    :class:`ConfigError` line naming the file and, where YAML knows it, the line:

    * the file cannot be read (``<path>: cannot read <what>: ...``);
    * a syntax error (``<path>:<line>: not valid YAML: ...``);
    * a language-specific tag (``!!python/object/apply:os.system``...): ``safe_load`` builds
      plain values only and refuses it; that is a refusal, not a crash, and the message says
      which tag and that only plain values are accepted."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read {what}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = str(getattr(err, "problem", None) or err).splitlines()[0]
        if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
            tag = problem.split("tag", 1)[1].strip(" '").removeprefix("tag:yaml.org,2002:")
            raise ConfigError(
                f"{path}{line}: YAML tag !!{tag} is not allowed; a {what} holds plain values "
                "only (mappings, lists, strings, numbers, booleans)"
            ) from None
        raise ConfigError(f"{path}{line}: not valid YAML: {problem}") from None


def read_yaml(path: str | Path) -> dict:
    """A ``--config`` file: a mapping of settings (:func:`load_yaml` for the errors)."""
    path = Path(path)
    raw = load_yaml(path)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings")
    return raw


def flatten_mapping(cls: type, mapping: dict, source: str) -> dict[str, tuple[object, str]]:
    """A nested (or flat, or mixed) mapping -> {flat option name: (value, where)}.

    At each level a key may be a section of that level, a field of that level, or any flat
    option name. ``source`` names the mapping in messages (a file path, "config.yaml")."""
    index = _index(cls)
    tree = sections(cls)
    out: dict[str, tuple[object, str]] = {}

    def walk(level: tuple[str, ...], values: dict, prefix: str) -> None:
        cls_here = tree[level]
        hints = typing.get_type_hints(cls_here)
        own = {f.name: f for f in dataclasses.fields(cls_here)}
        for key, value in values.items():
            key = str(key)
            where = f"{source}: {'.'.join((*level, key))}"
            if key in own and _is_section(hints[key]):
                if not isinstance(value, dict):
                    raise ConfigError(f"{where}: expected a mapping of settings")
                walk((*level, key), value, prefix + dict(own[key].metadata).get("prefix", ""))
                continue
            if key in own:
                name = prefix + key
            elif key in index:
                name = index[key].name
            else:
                known = sorted({*index, *own})
                raise ConfigError(f"{where}: unknown key{_suggest(key, known)}")
            if name in out and out[name][1] != where:
                raise ConfigError(f"{where}: set twice (also {out[name][1]})")
            out[name] = (value, where)

    walk((), mapping, "")
    return out


# ----- building an instance ---------------------------------------------------------------------
def build(cls: type, values: dict[str, tuple[object, str]]):
    """{flat name: (raw value, where)} -> a validated instance of ``cls`` (defaults elsewhere)."""
    converted: dict[tuple[str, ...], object] = {}
    for o in options(cls):
        if o.name in values:
            raw, where = values[o.name]
            value = convert(raw, o.type, where, commas=comma_rule(o))
            _check(o, value, where)
        elif o.required:
            raise ConfigError(f"{o.flag} is required")
        else:
            value = o.default()
        converted[o.path] = value

    def make(section_cls: type, path: tuple[str, ...]):
        hints = typing.get_type_hints(section_cls)
        kwargs = {}
        for f in dataclasses.fields(section_cls):
            if _is_section(hints[f.name]):
                kwargs[f.name] = make(_unwrap_optional(hints[f.name])[0], (*path, f.name))
            else:
                kwargs[f.name] = converted[(*path, f.name)]
        obj = section_cls(**kwargs)
        check = getattr(obj, "validate", None)
        if callable(check):
            check()
        return obj

    return make(cls, ())


def load(cls: type, mapping: dict | None = None, source: str = "settings", **overrides):
    """An instance of ``cls`` from a mapping (as in YAML) and keyword overrides (flat names):
    the Python twin of :func:`parse`, with the same checks."""
    values = flatten_mapping(cls, mapping or {}, source)
    index = _index(cls)
    for key, value in overrides.items():
        if key not in index:
            raise ConfigError(f"{key}: unknown setting{_suggest(key, sorted(index))}")
        values[index[key].name] = (value, key)
    return build(cls, values)


def to_dict(obj) -> dict:
    """Nested plain dict of a settings instance (paths as strings), for YAML/JSON files."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return plain(obj)


# ----- the command line -------------------------------------------------------------------------
def _default_text(o: Option) -> str:
    if o.required:
        return "required"
    value = o.default()
    if value is None:
        return "default: none"
    if isinstance(value, bool):
        return f"default: {str(value).lower()}"
    if isinstance(value, list):
        return f"default: {' '.join(map(str, value)) or '(empty)'}"
    return f"default: {value}"


def _yaml_flag(cls: type) -> str:
    """``--config FILE`` names the YAML file, unless the command has a setting of that name
    (``convert --config``: a dataset's config), where it is ``--config_file FILE``."""
    return "config_file" if "config" in _index(cls) else "config"


def build_parser(cls: type, prog: str, description: str = "", config_flag: bool = True):
    """An argparse parser with one flag (and its aliases) per option; no defaults are set on
    it (``SUPPRESS``), so :func:`parse` knows exactly which flags were given."""
    _index(cls)  # asserts unique names
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        allow_abbrev=False,  # --lr must not silently mean --lr_scheduler
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if config_flag:
        parser.add_argument(
            f"--{_yaml_flag(cls)}",
            dest="_yaml_file",
            metavar="FILE",
            help="YAML file of settings (flags override it)",
        )
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for o in options(cls):
        section = o.path[:-1]
        if section and section not in groups:
            groups[section] = parser.add_argument_group(".".join(section))
        target = groups.get(section, parser)
        meta = o.meta
        choices = _choices(o)
        extra = f"; one of: {', '.join(map(str, choices))}" if choices else ""
        help_text = f"{meta['help']} ({_default_text(o)}{extra})".strip().replace("%", "%%")
        base, _ = _unwrap_optional(o.type)
        kwargs: dict = {"help": help_text, "default": argparse.SUPPRESS}
        if meta["positional"]:
            kwargs.pop("default")
            kwargs["nargs"] = "*" if not o.required else "+"
            kwargs["metavar"] = meta["metavar"] or o.name.upper()
            target.add_argument(o.name, **kwargs)
            continue
        names = [o.name, *meta["aliases"]]
        flags = []
        for name in names:
            flags.append(f"-{name}" if len(name) == 1 else f"--{name}")  # -v
            if "_" in name:
                flags.append(f"--{name.replace('_', '-')}")
        kwargs["dest"] = o.name
        kwargs["metavar"] = meta["metavar"] or _type_name(o.type).split(" ")[0].upper()
        if typing.get_origin(base) is list:
            kwargs["nargs"] = "*"
        elif base is bool:
            kwargs["nargs"] = "?"
            kwargs["const"] = "true"
            kwargs["metavar"] = "BOOL"
        target.add_argument(*dict.fromkeys(flags), **kwargs)
        if base is bool:
            negative = [f"--no_{n}" for n in names] + [f"--no-{n.replace('_', '-')}" for n in names]
            target.add_argument(
                *dict.fromkeys(negative),
                dest=o.name,
                action="store_const",
                const="false",
                default=argparse.SUPPRESS,
                help=argparse.SUPPRESS,
            )
    return parser


def parse(cls: type, argv: list[str] | None, prog: str, description: str = ""):
    """Defaults <- ``--config`` YAML <- flags -> a validated instance of ``cls``.

    Unknown flags are a :class:`ConfigError` naming the closest known flag; ``--help`` and
    malformed flags (a missing value) exit through argparse as usual."""
    parser = build_parser(cls, prog, description)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = sorted(a for action in parser._actions for a in action.option_strings)
        first = unknown[0]
        hint = _suggest(first.split("=")[0], known) if first.startswith("-") else ""
        raise ConfigError(f"unknown option {first!r}{hint}; see {prog} --help")
    given = vars(args)
    values: dict[str, tuple[object, str]] = {}
    config = given.pop("_yaml_file", None)
    if config:
        values.update(flatten_mapping(cls, read_yaml(config), str(config)))
    index = _index(cls)
    for name, value in given.items():
        o = index[name]
        values[o.name] = (value, o.flag)
    return build(cls, values)
