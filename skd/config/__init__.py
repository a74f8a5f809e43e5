"""What `skd-cache build` and `skd-train` take: `BuildConfig` and `TrainConfig`, validated on
construction.

Both are pydantic dataclasses (`jobs.py`): every value and every combination of values is checked
when one is made, by the command lines or by a Python caller (and again by `dataclasses.replace`).
A bad one is one `OptionError` line naming the option as it is typed on the command line and what to
give instead (`--batch-size 0: give a whole number of at least 1`, worded in `fields.py`); a
pydantic ValidationError never leaves the package. The command lines take their option defaults from
here, so each default and each check is declared once. Where the dataset, a cache or a run lives is
text, a local path or a URL (s3://, gs://, az://, file://): the code that opens it turns it into a
Path or a Location.
"""

from skd.config.fields import path_text
from skd.config.jobs import (
    MIX_AND_AUGMENT,
    ONLINE_ONLY_OPTIONS,
    ONLINE_VIEWS,
    PLAN_OPTIONS,
    AugmentOptions,
    BuildConfig,
    MixOptions,
    TeacherInput,
    TrainConfig,
)

__all__ = [
    "MIX_AND_AUGMENT",
    "ONLINE_ONLY_OPTIONS",
    "ONLINE_VIEWS",
    "PLAN_OPTIONS",
    "AugmentOptions",
    "BuildConfig",
    "MixOptions",
    "TeacherInput",
    "TrainConfig",
    "path_text",
]
