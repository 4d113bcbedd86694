"""course_utils.progress: a stored run keeps one true final line, never a widget's first frame."""

import pytest

from course_utils.progress import HEADLESS_ENV, progress


def test_headless_bar_prints_only_its_final_state(monkeypatch, capsys):
    monkeypatch.setenv(HEADLESS_ENV, "1")
    assert sum(progress(range(188), desc="embedding", unit="chunk")) == sum(range(188))
    bar = progress(total=4, desc="gen", unit="question")
    bar.update(1)
    bar.close()
    bar.close()  # printed once
    assert capsys.readouterr().out.splitlines() == [
        "embedding: 100%|██████████| 188/188 chunk",
        "gen:  25%|██▌       | 1/4 question"]


def test_headless_bar_interrupted_shows_where_it_stopped(monkeypatch, capsys):
    monkeypatch.setenv(HEADLESS_ENV, "1")
    with pytest.raises(RuntimeError):
        with progress(total=4, desc="api gen", unit="question") as bar:
            bar.update(2)
            raise RuntimeError("server gone")
    assert "2/4 question" in capsys.readouterr().out


def test_live_bar_is_tqdm(monkeypatch, capsys):
    from tqdm.std import tqdm

    monkeypatch.delenv(HEADLESS_ENV, raising=False)
    bar = progress(range(3), desc="live")
    assert isinstance(bar, tqdm) and type(bar).__name__ != "FinalLine"
    list(bar)
    assert capsys.readouterr().out == ""  # tqdm draws on stderr
