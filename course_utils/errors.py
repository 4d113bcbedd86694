"""The one exception type a learner sees, with a message that says what to do next."""


class CourseError(RuntimeError):
    """A problem the learner can fix; the message names the fix."""
