"""The one exception type a learner sees, with a message that says what to do next."""

import math
import numbers


class CourseError(RuntimeError):
    """A problem the learner can fix; the message names the fix."""


# The two type checks every validator runs before it raises CourseError, in one place so they agree.
def is_whole(value) -> bool:
    """An int (numpy's too), but not True/False, which Python counts as 1/0."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A real, finite number: bools and text are mistakes, NaN and inf too."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
