"""The commands: `skd-cache` (build, info, stats, verify, codecs, recode) and `skd-train`.

Thin by design: parse and validate the options, call the library, print its one-line results and
errors.
"""

from skd.cli.main import main_cache, main_train

__all__ = ["main_cache", "main_train"]
