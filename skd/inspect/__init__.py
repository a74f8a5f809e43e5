"""Looking at a cache: `info` (what it holds and costs), `stats` (the teacher's outputs), `verify`
(data, weights, re-computed rows, integrity) and teachers compared on identical views.
"""

from skd.inspect.compare import compare_teachers
from skd.inspect.info import describe, info_lines
from skd.inspect.stats import logit_stats, stats_lines
from skd.inspect.verify import verify_cache

__all__ = [
    "describe",
    "info_lines",
    "logit_stats",
    "stats_lines",
    "verify_cache",
    "compare_teachers",
]
