"""Stage two: train a student from a cache (or online, with the teacher in the loop): the loop, its
run folder and checkpoints, the learning-rate and alpha schedules, and the student's evaluation.
"""

from skd.train.loop import train

__all__ = ["train"]
