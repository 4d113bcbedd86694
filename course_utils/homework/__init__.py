"""Homework that grades itself: ``from course_utils import homework``, then ``homework.check("L4.identity", answer)``.

``framework`` holds the machinery (tasks, ``attempt``, ``check``, saved progress); ``lesson1`` ...
``lesson6`` hold the checks of ``homework/0N_*.ipynb``, one module per notebook. Importing this
package registers every task; checks verify the work, not its wording: they re-count the story,
re-parse the downloaded file, re-ask the fine-tuned model, re-measure memory and re-score the
predictions file.
"""

from . import lesson1, lesson2, lesson3, lesson4, lesson5, lesson6  # noqa: F401  (registers the tasks)
from .framework import (EVIDENCE_ENV, MIME, PROGRESS_ENV, TASKS, Crashed, Missing, NotDone, Result, Task,
                        attempt, check, lesson_tasks, load_progress, progress_path, record_progress,
                        run_check, start, summary, task)
from .lesson1 import MEMORY_QUESTIONS  # the notebooks read these data of their lesson
from .lesson4 import GENERAL_QUESTIONS, identity_question

__all__ = ["EVIDENCE_ENV", "MIME", "PROGRESS_ENV", "TASKS", "Crashed", "Missing", "NotDone", "Result", "Task",
           "attempt", "check", "lesson_tasks", "load_progress", "progress_path", "record_progress", "run_check",
           "start", "summary", "task", "MEMORY_QUESTIONS", "GENERAL_QUESTIONS", "identity_question"]
