"""Stage one: decide a cache's identity, samples and plan, create or resume it, run the teacher over
every view and write whole shards; grow a cache by views; recode a cache to another codec.
"""

from skd.build.recode import recode_cache
from skd.build.teacher_pass import BuildSummary, build_cache, summary_lines

__all__ = ["BuildSummary", "build_cache", "summary_lines", "recode_cache"]
