"""course_utils.notebooks: `make course` / `make notebooks` run the lessons side by side."""

import os

import nbformat
import pytest

from course_utils.errors import CourseError
from course_utils.notebooks import run_notebooks, stored_seconds


def write(path, *sources):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.slow
def test_two_at_a_time_each_with_its_share_of_the_cpus(tmp_path, monkeypatch):
    for name in ("COURSE_THREADS", "OMP_NUM_THREADS"):  # as outside pytest-xdist's workers
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    probe = ("import os, time; time.sleep(1); "
             "print(os.getpid(), os.environ['COURSE_THREADS'], os.environ['OMP_NUM_THREADS'])")
    paths = [write(tmp_path / f"{name}.ipynb", probe) for name in ("b", "a")]
    paths.append(write(tmp_path / "c.ipynb", "1 / 0"))
    table = run_notebooks(paths, out_dir=tmp_path / "build", jobs=2)
    assert list(table.notebook) == ["b.ipynb", "a.ipynb", "c.ipynb"]  # the order asked for
    assert list(table.status) == ["ok", "ok", "error"] and "ZeroDivisionError" in table.error[2]
    assert "COURSE_THREADS" not in os.environ, "the runner changed its caller's environment"
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))  # no CPU quota on the CI machine kind
    outputs = [nbformat.read(tmp_path / "build" / f"{n}.ipynb", as_version=4).cells[0].outputs[0].text.split()
               for n in "ab"]
    assert [threads for _, *threads in outputs] == [[share, share]] * 2
    assert outputs[0][0] != outputs[1][0], "both ran in one kernel"
    assert (tmp_path / "build" / "html" / "a.html").is_file()


def test_longest_stored_run_starts_first_and_bad_jobs(tmp_path):
    from course_utils.paths import REPO_ROOT

    lessons = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
    seconds = {p.name: stored_seconds(p) for p in lessons}
    assert all(s > 0 for s in seconds.values()), seconds
    assert max(seconds, key=seconds.get).startswith("04_"), seconds  # the fine-tuning lesson
    assert stored_seconds(write(tmp_path / "fresh.ipynb", "1")) == 0
    for jobs in (0, 1.5, "2"):
        with pytest.raises(CourseError, match="whole number of notebooks"):
            run_notebooks([], jobs=jobs)
