"""The lesson-2 chat and the lesson-3 RAG chat, used through JupyterLab in headless Chromium.

For each lesson: open the notebook, run the cells up to the chat widget, then Send (a streamed reply
appears, and for RAG its sources), Stop (a long reply ends early and the widget takes a new
question) and Clear (the conversation is gone), saving screenshots of each state.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass

import pytest

from jlab import REPO_ROOT
from lab_page import (CHAT_STATE, ChatUI, NotebookPage, close_page, copy_to_docs, failure_shot,
                      front_end_errors, html_words, new_page, words)


@dataclass(frozen=True)
class Lesson:
    path: str
    slug: str  # screenshot names
    question: str
    sources: bool  # replies end with a "Sources" list
    marker: str = "ChatWidget("  # the first code cell containing this is the chat widget's


LESSONS = [
    Lesson("notebooks/02_chat_and_agents.ipynb", "lesson2-chat",
           "What is the capital of France?", sources=False),
    Lesson("notebooks/03_rag_knowledge_base.ipynb", "lesson3-rag-chat",
           "What is the vocabulary size of InternLM2?", sources=True),
]
# Any other notebook with a ChatWidget (e.g. a scratch one while changing the widget); "rag" in its
# name means its replies carry sources.
if os.environ.get("COURSE_BROWSER_CHAT_NOTEBOOK"):
    _path = os.environ["COURSE_BROWSER_CHAT_NOTEBOOK"]
    LESSONS = [Lesson(_path, "scratch-chat", LESSONS[1].question, sources="rag" in _path)]
LONG_QUESTION = "Write a very long story about a brave knight and a dragon, in many chapters."
FOLLOW_UP = "Name three colours."


def reply_words(bubble_html: str) -> list[str]:
    """The words of an assistant bubble's HTML, without its "🤖 Assistant" label."""
    found = html_words(bubble_html)
    return found[1:] if found[:1] == ["Assistant"] else found


@dataclass
class Chat:
    """A lesson's chat widget, live: the page side (``ui``) and the kernel side (``state()``)."""

    lesson: Lesson
    nb: NotebookPage
    ui: ChatUI
    cell_index: int
    ids: list  # the widget view's model id(s) in that cell's outputs

    def state(self) -> dict:
        """The widget's Python side: reply, session history, busy flag, last bubble's HTML."""
        return self.nb.kernel_json(CHAT_STATE, ids=self.ids)

    def shot(self, screenshots, name: str):
        """Screenshot the widget's cell (code + widget) as ``<slug>-<name>.png``; returns the path."""
        path = screenshots / f"{self.lesson.slug}-{name}.png"
        self.ui.scroll_log_to_end()  # as a student scrolls down to the newest message
        self.ui.root.scroll_into_view_if_needed()
        time.sleep(0.3)  # let the last streamed update paint
        self.nb.cell(self.cell_index).screenshot(path=str(path))
        return path


def _open_chat(page, lab, lesson: Lesson) -> Chat:
    started = time.monotonic()
    nb = NotebookPage(page, lab, lesson.path).open()
    index = nb.cell_index(lesson.marker)
    opened = time.monotonic()
    nb.run_through(index)
    print(f"[{lesson.slug}] opened in {opened - started:.0f} s, ran cells 0-{index} in "
          f"{time.monotonic() - opened:.0f} s", flush=True)
    ui = ChatUI(page, nb.cell(index))
    ui.root.wait_for(state="visible", timeout=60_000)
    ui.wait_idle()  # the widget's cell may have submitted a demo question itself
    return Chat(lesson, nb, ui, index, nb.widget_ids(index))


@pytest.fixture(scope="module", params=LESSONS, ids=lambda lesson: lesson.slug)
def chat(request, browser, lab, screenshots):
    """The lesson open in a page, run up to and including its chat widget cell."""
    lesson = request.param
    if not (REPO_ROOT / lesson.path).is_file():
        pytest.fail(f"{lesson.path} does not exist")
    context, page = new_page(browser)
    try:
        try:
            chat = _open_chat(page, lab, lesson)
        except Exception:
            (screenshots / "failures").mkdir(exist_ok=True)
            page.screenshot(path=str(screenshots / "failures" / f"{lesson.slug}-setup.png"))
            raise
        yield chat
    finally:
        close_page(context, page, lab, request.node, screenshots)


@pytest.fixture(autouse=True)
def _screenshot_on_failure(request, chat, screenshots):
    yield
    failure_shot(chat.nb.page, request.node, screenshots)


def _ask_and_wait(chat: Chat, question: str) -> dict:
    before = chat.ui.ask(question)
    chat.ui.wait_started(before)
    chat.ui.wait_idle()
    return chat.state()


def _sources_on_page(chat: Chat) -> list[str]:
    """The file names in the newest reply's rendered "Sources" list."""
    bubble = chat.ui.assistant_bubble()
    return bubble.locator("ol li code, ul li code").all_inner_texts()


def _sources_in_reply(reply: str) -> list[str]:
    tail = reply.split("**Sources**", 1)[1] if "**Sources**" in reply else ""
    return re.findall(r"`([^`]+)`", tail)


def test_send_streams_reply(chat, screenshots, docs_images):
    chat.ui.set_max_tokens(96)  # short answers keep the suite within minutes on 2 cores
    chat.ui.record_frames()
    state = _ask_and_wait(chat, chat.lesson.question)

    assert not state["busy"]
    reply = state["reply"].strip()
    assert len(words(reply)) >= 3, f"the model's reply is (nearly) empty: {reply!r}"
    assert state["history"][-2:] == [{"role": "user", "content": chat.lesson.question},
                                     {"role": "assistant", "content": reply}]
    # The page shows the question and exactly the words of the reply the kernel rendered.
    assert chat.lesson.question in chat.ui.bubble_texts("user")[-1]
    shown = chat.ui.last_reply_text()
    assert words(shown) == reply_words(state["last_html"]), (shown, state["last_html"])
    assert words(reply)[:5] == words(shown)[:5]
    # It streamed: the bubble showed partial replies (with the cursor) before the final one.
    partial = [f for f in chat.ui.frames() if "▌" in f]
    assert len(partial) >= 2, f"no streaming seen in the page: {chat.ui.frames()[:5]}"
    if chat.lesson.sources:
        listed = _sources_on_page(chat)
        assert listed, "the reply has no Sources list on the page"
        assert listed == _sources_in_reply(reply)
        kb_files = [p.as_posix() for p in (REPO_ROOT / "data").rglob("*") if p.is_file()]
        assert all(any(f.endswith("/" + s) for f in kb_files) for s in listed), listed
        assert chat.ui.assistant_bubble().locator("strong", has_text="Sources").count() == 1
    assert not front_end_errors(chat.nb.page), front_end_errors(chat.nb.page)
    path = chat.shot(screenshots, "reply")
    copy_to_docs(path, docs_images, f"{chat.lesson.slug}.png")


# Geometry of the conversation as the page lays it out (the order a reader sees, not the DOM's).
_LAYOUT_JS = """
const log = root.querySelector('.course-chat-log');
const box = log.parentElement;  // the scrolling box around the log
const rect = e => { const r = e.getBoundingClientRect(); return {top: r.top, bottom: r.bottom}; };
const kids = [...log.children].filter(e => /course-chat-(user|assistant)/.test(e.className));
const label = name => { const l = root.querySelector('.course-chat-' + name + ' .widget-label');
  return {text: l.innerText.trim(), clipped: l.scrollWidth > l.clientWidth}; };
const css = getComputedStyle(box);  // in the failure message: why the box does or does not scroll
return {box: rect(box), labels: [label('temperature'), label('max-tokens')],
        scroll: {overflow: css.overflowY, flow: css.flexDirection, maxHeight: css.maxHeight,
                 top: box.scrollTop, height: box.scrollHeight, client: box.clientHeight},
        bubbles: kids.map(e => ({who: e.className.includes('course-chat-user') ? 'user' : 'assistant',
                                 text: e.innerText, ...rect(e)}))};
"""


def _scroll_box(chat: Chat, js_value: str) -> None:
    """Set the conversation box's scrollTop (a JS expression of ``box``) and let it paint."""
    chat.ui._eval(f"const box = root.querySelector('.course-chat-log').parentElement; "
                  f"box.scrollTop = {js_value};")
    time.sleep(0.3)


def test_transcript_reads_oldest_first_with_each_question_above_its_reply(chat):
    if len(chat.ui.bubble_texts("user")) < 2:  # run on its own: make a two-exchange conversation
        chat.ui.set_max_tokens(48)
        for question in (chat.lesson.question, FOLLOW_UP)[len(chat.ui.bubble_texts("user")):]:
            _ask_and_wait(chat, question)
    history = chat.state()["history"]
    questions = [m["content"] for m in history if m["role"] == "user"]
    _scroll_box(chat, "-box.scrollHeight")  # the top: the oldest message (clamped either way)
    layout = chat.ui._eval(_LAYOUT_JS)
    bubbles = layout["bubbles"]
    # Reading order top to bottom = the session's order: question 1, reply 1, question 2, reply 2...
    assert [b["who"] for b in bubbles] == ["user", "assistant"] * len(questions), bubbles
    assert all(a["top"] < b["top"] for a, b in zip(bubbles, bubbles[1:])), bubbles
    assert [q in b["text"] for q, b in zip(questions, bubbles[::2])] == [True] * len(questions)
    # The labels show whole ("temperature", not "temperat...").
    assert layout["labels"] == [{"text": "temperature", "clipped": False},
                                {"text": "max tokens", "clipped": False}], layout["labels"]

    # A box shorter than the newest exchange (a small window, or a long reply): scrolled to the newest
    # message, the question that produced it is still whole in view, above the reply's last lines.
    question, reply = bubbles[-2], bubbles[-1]
    short = int(0.75 * (reply["bottom"] - question["top"]))
    chat.ui._eval(f"root.querySelector('.course-chat-log').parentElement.style.maxHeight = '{short}px';")
    try:
        _scroll_box(chat, "box.scrollHeight")  # the bottom, where new text arrives
        layout = chat.ui._eval(_LAYOUT_JS)
        box, question, reply = layout["box"], layout["bubbles"][-2], layout["bubbles"][-1]
        why = (layout["scroll"], box, question["top"], question["bottom"], reply["top"], reply["bottom"])
        assert box["bottom"] - box["top"] <= short + 10, why  # the exchange no longer fits
        assert questions[-1] in question["text"]
        assert box["top"] - 1 <= question["top"] and question["bottom"] <= box["bottom"] + 1, why
        assert question["bottom"] < reply["bottom"] <= box["bottom"] + 1, why
    finally:
        chat.ui._eval("root.querySelector('.course-chat-log').parentElement.style.maxHeight = '';")
        _scroll_box(chat, "box.scrollHeight")


def test_stop_ends_generation_and_accepts_new_question(chat, screenshots):
    chat.ui.set_max_tokens(1024)
    before = chat.ui.ask(LONG_QUESTION)
    chat.ui.wait_started(before)
    chat.ui.wait_streaming(min_words=8)
    words_at_click = len(words(chat.ui.last_reply_text()))
    chat.ui.stop.click()
    chat.ui.wait_idle(timeout=45)  # generate() checks the stop flag after every token

    final = chat.ui.last_reply_text()
    time.sleep(3)
    assert chat.ui.last_reply_text() == final, "the reply kept growing after Stop"
    state = chat.state()
    assert not state["busy"], "the generation thread is still running after Stop"
    assert state["history"][-2]["content"] == LONG_QUESTION
    assert words(final) == reply_words(state["last_html"])
    body = state["history"][-1]["content"].split("**Sources**")[0]
    # Stopped early: far fewer words than 1024 tokens would give, and close to what was on screen.
    assert 1 <= len(words(body)) <= words_at_click + 80, (words_at_click, body)
    if chat.lesson.sources:  # RAG keeps the sources of a stopped answer
        assert _sources_on_page(chat)
    chat.shot(screenshots, "stopped")

    chat.ui.set_max_tokens(48)
    state = _ask_and_wait(chat, FOLLOW_UP)
    assert state["history"][-2]["content"] == FOLLOW_UP
    assert FOLLOW_UP in chat.ui.bubble_texts("user")[-1]
    assert words(state["reply"]), "no reply to the question asked after Stop"
    assert words(chat.ui.last_reply_text()) == reply_words(state["last_html"])


def test_clear_empties_conversation(chat, screenshots):
    if not chat.ui.bubble_texts("user"):  # run on its own (-k clear): make something to clear
        _ask_and_wait(chat, FOLLOW_UP)
    assert chat.ui.bubble_texts("assistant")
    chat.ui.clear.click()
    chat.ui.wait_empty(timeout=30)
    state = chat.state()
    assert state["history"] == [] and state["bubbles"] == 0
    assert not chat.ui.send.is_disabled() and chat.ui.input.is_editable()
    chat.shot(screenshots, "cleared")
