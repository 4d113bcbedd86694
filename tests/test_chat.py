"""ChatSession (history, trimming, streaming, stop), ChatWidget.submit, write_story, cli_chat."""

import threading
import time

import pytest

from course_utils.chat import (ChatSession, ChatWidget, Generation, count_words, cli_chat,
                               write_story)
from course_utils.errors import CourseError


class WordBackend:
    """A stand-in model: one token per word, replies with a fixed text word by word."""

    def __init__(self, reply="one two three four five six", context_tokens=100, delay=0.0):
        self.reply, self.context_tokens, self.delay = reply, context_tokens, delay
        self.prompts, self.gens = [], []

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) + 2 for m in messages)

    def clip_text(self, text, max_tokens):
        return " ".join(text.split()[-max_tokens:]) if max_tokens > 0 else ""

    def stream(self, messages, gen, stop):
        self.prompts.append(messages)
        self.gens.append(gen)
        for word in self.reply.split()[:gen.max_new_tokens]:
            if stop.is_set():
                return
            time.sleep(self.delay)
            yield word + " "


def fake_session(**kw):
    return ChatSession(WordBackend(**kw), system_prompt="Be brief.",
                       generation=Generation(max_new_tokens=20), on_notice=lambda m: None)


class ProtocolOnly:
    """The bare chat protocol (as a RAG chain wraps it): no generation settings."""

    def __init__(self):
        self.history = []

    def ask(self, text, stream=False):
        def gen():
            self.history.append({"role": "user", "content": text})
            parts = ["The answer is 42.", "\n\n**Sources**\n\n- `docs/guide.md`"]
            yield from parts
            self.history.append({"role": "assistant", "content": "".join(parts)})
        return gen() if stream else "".join(gen())

    def stop(self):
        pass

    def reset(self):
        self.history.clear()


def test_history_and_system_prompt():
    s = fake_session()
    assert s.ask("Hello") == "one two three four five six"
    assert s.history == [{"role": "user", "content": "Hello"},
                         {"role": "assistant", "content": "one two three four five six"}]
    assert s.backend.prompts[0][0] == {"role": "system", "content": "Be brief."}
    s.ask("Again")
    assert [m["content"] for m in s.backend.prompts[1][1:]] == [
        "Hello", "one two three four five six", "Again"]
    s.reset()
    assert s.history == [] and s.system_prompt == "Be brief."


def test_stream_yields_chunks_and_records_reply():
    s = fake_session()
    chunks = list(s.ask("Hi", stream=True))
    assert len(chunks) == 6 and "".join(chunks).strip() == s.history[-1]["content"]


def test_stop_keeps_the_partial_reply():
    s = fake_session()
    got = []
    for chunk in s.ask("Tell me more", stream=True):
        got.append(chunk)
        if len(got) == 2:
            s.stop()
    assert s.history[-1] == {"role": "assistant", "content": "one two"}


def test_breaking_out_of_the_stream_keeps_the_partial_reply():
    s = fake_session()
    for i, _ in enumerate(s.ask("Go", stream=True)):
        if i == 2:
            break
    assert s.history[-1]["content"] == "one two three"


def test_stop_from_another_thread():
    s = fake_session(delay=0.05)
    timer = threading.Timer(0.12, s.stop)
    timer.start()
    reply = s.ask("slow please")
    timer.join()
    assert 0 < len(reply.split()) < 6 and s.history[-1]["content"] == reply


def test_trimming_drops_oldest_turns_with_a_notice():
    notices = []
    s = ChatSession(WordBackend(context_tokens=60), generation=Generation(max_new_tokens=10),
                    on_notice=notices.append)
    for i in range(6):
        s.ask(f"question number {i} " + "pad " * 5)
    assert notices and "oldest message" in notices[-1]
    last_prompt = s.backend.prompts[-1]
    assert s.backend.count_tokens(last_prompt) <= 60 - 10
    assert last_prompt[-1]["content"].startswith("question number 5")
    assert last_prompt[0]["role"] == "user"  # trimmed to whole turns
    assert len(s.history) == 12  # the history itself is kept whole


def test_a_too_long_message_is_clipped_not_crashed():
    notices = []
    s = ChatSession(WordBackend(context_tokens=40), generation=Generation(max_new_tokens=10),
                    on_notice=notices.append)
    s.ask("word " * 200 + "END")
    assert "only its end is sent" in notices[-1]
    sent = s.backend.prompts[-1][-1]["content"]
    assert sent.endswith("END") and len(sent.split()) < 40


def test_generation_overrides_and_validation():
    s = fake_session()
    s.ask("x", max_new_tokens=2, temperature=0.5)
    assert s.backend.gens[-1].max_new_tokens == 2 and s.backend.gens[-1].temperature == 0.5
    assert s.generation.max_new_tokens == 20  # per-call overrides don't stick
    with pytest.raises(CourseError, match="Unknown generation setting"):
        s.ask("x", max_tokens=5)
    with pytest.raises(CourseError):
        s.ask("   ")


def test_complete_is_stateless():
    s = fake_session()
    out = s.complete([{"role": "user", "content": "hi"}], max_new_tokens=3)
    assert out == "one two three" and s.history == []


def test_widget_submit_streams_into_the_view():
    s = fake_session()
    w = ChatWidget(s)
    w.temperature.value, w.max_tokens.value = 0.3, 32
    reply = w.submit("Hello there")
    assert reply.strip() == "one two three four five six"
    assert len(w.log.children) == 2
    assert "Hello there" in w.log.children[0].value and "four five" in w.log.children[1].value
    assert [b._dom_classes for b in w.log.children] == [("course-chat-user", "course-chat-current"),
                                                         ("course-chat-assistant",)]
    assert s.generation.temperature == 0.3 and s.generation.max_new_tokens == 32
    assert w.send_button.disabled is False and w.stop_button.disabled is True
    assert "**assistant:**" in w.transcript()
    w.clear()
    assert w.log.children == () and s.history == []


def test_widget_parts_carry_stable_css_classes():
    w = ChatWidget(fake_session())
    parts = {w.view: "course-chat", w.log: "course-chat-log", w.text: "course-chat-input",
             w.send_button: "course-chat-send", w.stop_button: "course-chat-stop",
             w.clear_button: "course-chat-clear", w.temperature: "course-chat-temperature",
             w.max_tokens: "course-chat-max-tokens", w.status: "course-chat-status"}
    assert all(name in part._dom_classes for part, name in parts.items())
    scroller = w.view.children[1]
    assert scroller.children == (w.log,) and scroller.layout.flex_flow == "column-reverse"
    # grows with the chat up to the height, so a short conversation shows whole (no band above it)
    assert scroller.layout.max_height == "480px" and not scroller.layout.height
    assert scroller.layout.overflow == "auto"  # it scrolls (ipywidgets 8 has no overflow_y)
    # the log inside keeps its height (something to scroll) and is no scroll container itself (sticky)
    assert (w.log.layout.flex, w.log.layout.overflow) == ("0 0 auto", "visible")
    assert w.temperature.style.description_width == "initial"


def test_widget_log_reads_oldest_first_and_only_the_newest_question_sticks():
    w = ChatWidget(fake_session())
    w.submit("first question")
    w.submit("second question")
    roles = ["user" if "course-chat-user" in b._dom_classes else "assistant" for b in w.log.children]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert "first question" in w.log.children[0].value and "second question" in w.log.children[2].value
    sticky = [b for b in w.log.children if "course-chat-current" in b._dom_classes]
    assert sticky == [w.log.children[2]]  # the question being answered, not the older one
    assert "position:sticky" in w.view.children[0].value


def test_widget_renders_appended_markdown_from_any_protocol_object():
    w = ChatWidget(ProtocolOnly())
    reply = w.submit("What is the answer?")
    assert reply.endswith("`docs/guide.md`")
    html = w.log.children[-1].value
    assert "<strong>Sources</strong>" in html and "<code>docs/guide.md</code>" in html
    assert w.temperature.disabled  # nothing to tune on a bare protocol object


def test_widget_shows_errors_instead_of_raising():
    class Broken(ProtocolOnly):
        def ask(self, text, stream=False):
            raise CourseError("server is down: start it")

    w = ChatWidget(Broken())
    assert w.submit("hi") == ""
    assert "server is down" in w.status.value


def test_count_words_english_and_chinese():
    assert count_words("It's a well-known fact, isn't it?") == 6
    assert count_words("从前有一座山。Once") == 7
    assert count_words("从前有一座山", language="en") == 0
    with pytest.raises(CourseError):
        count_words("x", language="fr")


class Storyteller(ProtocolOnly):
    def __init__(self, piece):
        super().__init__()
        self.piece, self.prompts = piece, []

    def ask(self, text, stream=False):
        self.prompts.append(text)
        return self.piece


def test_write_story_keeps_asking_until_long_enough():
    teller = Storyteller(" ".join(["word"] * 120))
    story = write_story(teller, "a brave robot", min_words=300)
    assert story.rounds == 3 and story.length == 360
    assert "a brave robot" in teller.prompts[0] and teller.prompts[1].startswith("Continue")


def test_write_story_counts_chinese_characters_and_stops():
    teller = Storyteller("小猫在花园里玩耍。" * 10)  # 80 characters a round
    story = write_story(teller, "一只小猫", min_words=300)
    assert story.rounds == 4 and story.length == 320 and "300" in teller.prompts[0]
    stubborn = Storyteller("Short.")
    assert write_story(stubborn, "x", min_words=300, max_rounds=3).rounds == 3


def test_cli_chat_runs_scripted_inputs(capsys):
    s = fake_session()
    cli_chat(s, ["Hi", "exit", "never sent"])
    out = capsys.readouterr().out
    assert "User  >>> Hi" in out and "Robot >>> one two" in out and out.strip().endswith("Bye.")
    assert len(s.history) == 2


@pytest.mark.slow
def test_local_model_streams_the_same_reply_and_stops(tiny_model):
    s = ChatSession.load(tiny_model, system_prompt="You are a helpful assistant.",
                         max_new_tokens=12)
    full = s.ask("What is the capital of France?")
    assert "Paris" in full
    s.reset()
    assert "".join(s.ask("What is the capital of France?", stream=True)).strip() == full
    pieces = []
    for piece in s.ask("Write a long poem about the sea.", stream=True, max_new_tokens=200):
        pieces.append(piece)
        if len(pieces) == 3:
            s.stop()  # generation ends at its next step, far short of 200 tokens
    partial = s.history[-1]["content"]
    assert partial.startswith("".join(pieces[:3]).strip())
    assert len(s.backend.tokenizer.encode(partial)) < 100 and len(s.history) == 4


@pytest.mark.slow
def test_local_trimming_with_the_real_tokenizer(tiny_model):
    notices = []
    s = ChatSession.load(tiny_model, context_tokens=120, max_new_tokens=8)
    s.on_notice = notices.append
    s.history = [{"role": r, "content": "a fairly long message about nothing " * 4}
                 for r in ["user", "assistant"] * 3]
    s.ask("Say hi.")
    assert notices and s.backend.count_tokens(s.messages(s.history[-2:-1])) < 120


def test_adapter_folder_is_checked_before_loading(tmp_path):
    with pytest.raises(CourseError, match="adapter_config.json"):
        ChatSession.load("no-model-needed", adapter=tmp_path)


@pytest.mark.slow
def test_load_with_a_lora_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from course_utils.models import load_model

    model, tok = load_model("smollm2-135m-instruct")
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    base = lora.unload()  # a clean base again; the adapter's B matrices are zero at init
    s = ChatSession.load((base, tok), adapter=tmp_path / "adapter", max_new_tokens=6)
    assert isinstance(s.backend.model, PeftModel)
    assert "Paris" in s.ask("What is the capital of France?")


def test_widget_buttons_send_in_the_background_and_stop():
    s = fake_session(reply=" ".join(f"w{i}" for i in range(20)), delay=0.05)
    w = ChatWidget(s)
    w.text.value = "Go on"
    w.send_button.click()  # returns at once: the reply streams in a thread
    assert w.text.value == "" and w._thread.is_alive()
    time.sleep(0.2)
    w.stop_button.click()
    w._thread.join(5)
    kept = s.history[-1]["content"].split()
    assert 0 < len(kept) < 20 and w.last_reply.split() == kept
    assert w.send_button.disabled is False
