"""The words and types of the config fields: what each takes, and a ValidationError as one line.

A field's option is its name as typed on the command line (`batch_size` -> `--batch-size`); a bad
value is one `OptionError` line naming that option, the value as typed and what to give instead,
worded from the field's type and constraints (`--batch-size 0: give a whole number of at least 1`)
or from the description it carries. Places (a dataset root, a cache, a run folder) are text, a local
path or a URL; `path_text` names a Path as the place it is.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from pathlib import PurePath
from types import NoneType, UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BeforeValidator, ConfigDict, Field, ValidationError, validate_call
from pydantic.fields import FieldInfo

from skd.errors import OptionError, SkdError

# finite numbers only (nan or inf would train silently to NaN weights); no unknown names
CHECKED = ConfigDict(allow_inf_nan=False, extra="forbid")
# fields whose command-line option is named otherwise (crop has none)
OPTIONS = {"shard_rows": "--shard-size", "chunk_rows": "--chunk-size", "crop": "crop"}
# pathlib turns "s3://b/p" into "s3:/b/p": a Path made of a URL is read as that URL
COLLAPSED = re.compile(r"^(s3|s3a|gs|gcs|az|azure|abfs|abfss|file):/(?!/)")


def option(name: str) -> str:
    """The command-line option of a field: batch_size -> --batch-size."""
    return OPTIONS.get(name, "--" + name.replace("_", "-"))


def typed(value) -> str:
    """A value as it is typed on the command line: 0.5,0.5,0.5 for a tuple."""
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def as_typed(name: str, value) -> str:
    """A field's option and value as typed: --views 3, --no-val."""
    if isinstance(value, bool):
        return f"--{'' if value else 'no-'}{name.replace('_', '-')}"
    return f"{option(name)} {typed(value)}"


def path_text(path: PurePath) -> str:
    """A Path as the place it names: one made of a URL regains its //."""
    return COLLAPSED.sub(
        lambda m: m.group(1) + (":///" if m.group(1) == "file" else "://"), str(path)
    )


def place_text(value):
    """A folder or URL as text (several: each): a Path by the place it names, a Location
    (skd.storage) as it prints; anything else as given, for the field's type to check."""
    if isinstance(value, (list, tuple)):
        return [place_text(v) for v in value]
    if isinstance(value, PurePath):
        return path_text(value)
    if value is None or isinstance(value, (str, int, float, dict)):
        return value
    return str(value)


def comma_items(value):
    """Comma-separated items of a string as a list: "0.5,0.5,0.5" -> ["0.5", "0.5", "0.5"]."""
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else value


Place = Annotated[str, BeforeValidator(place_text), Field(description="a folder or URL")]
Positive = Annotated[float, Field(gt=0)]
RGB = Annotated[
    tuple[float, float, float],
    BeforeValidator(comma_items),
    Field(description="three numbers R,G,B, e.g. 0.5,0.5,0.5"),
]
PositiveRGB = Annotated[
    tuple[Positive, Positive, Positive],
    BeforeValidator(comma_items),
    Field(description="three numbers R,G,B, each above 0, e.g. 0.5,0.5,0.5"),
]
PROBABILITY = Field(ge=0, le=1, description="a probability between 0 and 1")
ALPHA = Field(ge=0, description="a finite Beta alpha, at least 0 (0 turns it off)")


class Resumed:
    """Marks a TrainConfig field that a resumed run must repeat (`TrainConfig.settings`)."""


KINDS = {int: "a whole number", float: "a finite number", bool: "true or false", str: "text"}
BOUNDS = {"ge": "of at least {}", "gt": "above {}", "le": "of at most {}", "lt": "below {}"}


def wants(annotation, metadata=()) -> str:
    """What a field takes, in words, from its type and constraints ("a whole number of at least 1",
    "one of step, cosine"), or the description it carries."""
    if get_origin(annotation) is Annotated:
        annotation, *more = get_args(annotation)
        metadata = [*metadata, *more]
    infos = [m for m in metadata if isinstance(m, FieldInfo)]
    described = [info.description for info in infos if info.description]
    if described:
        return described[0]
    if get_origin(annotation) in (Union, UnionType):
        return ", or ".join(wants(a) for a in get_args(annotation) if a is not NoneType)
    if get_origin(annotation) is Literal:
        words = [str(choice) for choice in get_args(annotation)]
        return words[0] if len(words) == 1 else "one of " + ", ".join(words)
    constraints = [*metadata, *(c for info in infos for c in info.metadata)]
    bounds = {key: getattr(c, key) for c in constraints for key in BOUNDS if hasattr(c, key)}
    if "ge" in bounds and "le" in bounds:
        words = [f"from {bounds['ge']} to {bounds['le']}"]
    else:
        words = [BOUNDS[key].format(value) for key, value in bounds.items()]
    return " ".join([KINDS.get(annotation, "a value"), *words])


def one_line(cls, exc: ValidationError, given: dict) -> SkdError:
    """The first of a ValidationError's errors as an OptionError, one line naming the option (a
    check that raised an SkdError: that error itself); a value given comes before a value
    missing."""

    def missing(error: dict) -> bool:
        return error["type"] == "missing" and len(error["loc"]) == 1

    error = sorted(exc.errors(), key=missing)[0]
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, SkdError):
        return cause
    name = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "unexpected_keyword_argument":
        return OptionError(f"{name}: {cls.__name__} has no such option")
    if name not in cls.__pydantic_fields__:
        return OptionError(f"{cls.__name__}: {error['msg']} (give its options by name)")
    if missing(error):
        return OptionError(f"{option(name)} is required")
    info = cls.__pydantic_fields__[name]
    why = str(cause) if cause is not None else "give " + wants(info.annotation, [info])
    return OptionError(f"{option(name)} {typed(given.get(name, error['input']))}: {why}")


def checked(cls):
    """`cls` with its ValidationError turned into `one_line`'s error."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except ValidationError as exc:
            raise one_line(cls, exc, kwargs) from None

    cls.__init__ = __init__
    return cls


def argument_error(error: dict, names: list[str], args: tuple, kwargs: dict) -> OptionError:
    """A validate_call error as one line: the argument as the caller gave it, which item of it (of a
    tuple or list) and what it should be."""
    where, *item = error["loc"] or ("?",)
    name = names[where] if isinstance(where, int) else where
    given = args[where] if isinstance(where, int) else kwargs.get(where, error["input"])
    at = f" item {item[0]}:" if item else ""
    why = error["msg"][0].lower() + error["msg"][1:]
    return OptionError(f"{name}={given!r}:{at} {why}")


def checked_call(function):
    """`function` with its arguments checked against its annotations when called (pydantic's
    validate_call, finite numbers only): a bad one is one OptionError line naming the argument as a
    Python caller writes it (`batch_size=0: ...`). The library API's entry points use it."""
    names = list(inspect.signature(function).parameters)

    @functools.cache  # at the first call: the annotations may name what the module defines later
    def validated():
        config = ConfigDict(allow_inf_nan=False, arbitrary_types_allowed=True)
        return validate_call(function, config=config)

    @functools.wraps(function)
    def call(*args, **kwargs):
        try:
            return validated()(*args, **kwargs)
        except ValidationError as exc:
            if (
                exc.title != function.__qualname__
            ):  # raised inside the function, not by its arguments
                raise
            raise argument_error(exc.errors()[0], names, args, kwargs) from None

    return call


def changed(cfg, names) -> list[str]:
    """The fields of `names` that `cfg` sets to other than their defaults, as typed."""
    fields = type(cfg).__pydantic_fields__
    return [
        as_typed(name, getattr(cfg, name))
        for name in names
        if getattr(cfg, name) != fields[name].get_default(call_default_factory=True)
    ]


def dataset_root(data: str | None) -> str:
    """`data`, else $SKD_DATA: the dataset root, which has no default."""
    data = data or os.environ.get("SKD_DATA")
    if not data:
        raise OptionError("no dataset: pass --data ROOT or set SKD_DATA")
    return data
