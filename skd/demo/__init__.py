"""`make demo` (`python -m skd.demo`): the whole product on real handwritten digits in minutes on a
CPU.

Its teacher and student are named on the command line as `py:skd.demo:teacher` and
`py:skd.demo:student`.
"""

from skd.demo.models import student, teacher

__all__ = ["student", "teacher"]
