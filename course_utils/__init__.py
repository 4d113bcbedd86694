"""Helpers for the InternLM Bootcamp notebooks.

Importing this package is cheap: heavy libraries (torch, transformers, peft, chromadb, ...) are
imported inside the functions that need them, so ``import course_utils`` works anywhere.
"""

from .errors import CourseError

__all__ = ["CourseError"]
__version__ = "0.1.0"
