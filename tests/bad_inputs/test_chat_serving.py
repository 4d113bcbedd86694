"""Learner mistakes in chat and serving (issue #14): each gives one CourseError that names the
argument and the fix, raised before any slow work; a failed ask()/complete() leaves the history
exactly as it was.

The chat rows run on the real tiny model (one load per test session, the ``tiny_model`` fixture);
the serve rows must fail before any server process starts.
"""

import copy
import re
import socket
import time

import pytest

from course_utils import serving
from course_utils.chat import ChatSession, Generation, cli_chat, count_words, write_story
from course_utils.errors import CourseError

HISTORY = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


@pytest.fixture
def chat(tiny_model):
    session = ChatSession.load(tiny_model, system_prompt="Be brief.", max_new_tokens=4)
    session.on_notice = lambda msg: None
    session.history = copy.deepcopy(HISTORY)  # a history to keep, so "unchanged" means something
    return session


def nowhere() -> str:
    """A URL where no server listens (the port was free a moment ago)."""
    return f"http://127.0.0.1:{serving.free_port()}/v1"


def raises_keeping_history(session, call, fragment):
    before = copy.deepcopy(session.history)
    with pytest.raises(CourseError, match=re.escape(fragment)):
        call(session)
    assert session.history == before


# ---- generation settings: the same check wherever a learner can pass them ------------------------

BAD_SETTINGS = [
    (dict(max_new_tokens=0), "max_new_tokens=0: use a whole number of tokens to generate, 1 or more"),
    (dict(max_new_tokens=-1), "max_new_tokens=-1: use a whole number"),
    (dict(max_new_tokens="8"), "max_new_tokens='8': use a whole number"),
    (dict(max_new_tokens=8.5), "max_new_tokens=8.5: use a whole number"),
    (dict(max_new_tokens=True), "max_new_tokens=True: use a whole number"),
    (dict(temperature=-1), "temperature=-1: use a number from 0 to 2"),
    (dict(temperature=3), "temperature=3: use a number from 0 to 2"),
    (dict(temperature="0.7"), "temperature='0.7': use a number from 0 to 2"),
    (dict(temperature=float("nan")), "temperature=nan: use a number from 0 to 2"),
    (dict(top_p=5), "top_p=5: use a number above 0 and at most 1"),
    (dict(top_p=0), "top_p=0: use a number above 0 and at most 1"),
    (dict(top_p=None), "top_p=None: use a number above 0 and at most 1"),
    (dict(repetition_penalty=0), "repetition_penalty=0: use a number above 0"),
    (dict(repetition_penalty=-1.1), "repetition_penalty=-1.1: use a number above 0"),
]
UNKNOWN_SETTINGS = [
    (dict(max_tokens=8), "max_tokens is called max_new_tokens here"),
    (dict(top_k=5), "Unknown generation setting(s) ['top_k']"),
]

SESSION_CALLS = {
    "ask": lambda s, kw: s.ask("Hi", **kw),
    "ask-stream": lambda s, kw: list(s.ask("Hi", stream=True, **kw)),
    "complete": lambda s, kw: s.complete([{"role": "user", "content": "Hi"}], **kw),
}


@pytest.mark.slow
@pytest.mark.parametrize("call", SESSION_CALLS)
@pytest.mark.parametrize("kwargs, fragment", BAD_SETTINGS + UNKNOWN_SETTINGS)
def test_bad_generation_setting_per_call(chat, call, kwargs, fragment):
    raises_keeping_history(chat, lambda s: SESSION_CALLS[call](s, kwargs), fragment)


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, fragment", BAD_SETTINGS + UNKNOWN_SETTINGS)
def test_bad_generation_setting_when_building_a_session(tiny_model, kwargs, fragment):
    with pytest.raises(CourseError, match=re.escape(fragment)):
        ChatSession.load(tiny_model, **kwargs)
    with pytest.raises(CourseError, match=re.escape(fragment)):
        ChatSession.remote(nowhere(), model="m", **kwargs)


@pytest.mark.parametrize("kwargs, fragment", BAD_SETTINGS)
def test_bad_generation_setting_in_a_generation(kwargs, fragment):
    with pytest.raises(CourseError, match=re.escape(fragment)):
        Generation(**kwargs)


def test_numpy_settings_become_plain_numbers():
    np = pytest.importorskip("numpy")
    gen = Generation(max_new_tokens=np.int64(8), temperature=np.float32(0.5))
    assert type(gen.max_new_tokens) is int and type(gen.temperature) is float  # JSON-safe for remote


# ---- ask / complete: the message, the history, the system prompt ---------------------------------

ASK_ROWS = [
    (lambda s: s.ask(""), "ask() needs the message as a non-empty string"),
    (lambda s: s.ask("   "), "ask() needs the message as a non-empty string"),
    (lambda s: s.ask(None), "ask() needs the message as a non-empty string, not None"),
    (lambda s: s.ask("Hi", 200), "stream=200: use True or False"),
    (lambda s: list(s.ask("Hi", stream="yes")), "stream='yes': use True or False"),
    (lambda s: s.ask("Hi", max_new_tokens=5000), "max_new_tokens=5000 leaves no room for the prompt"),
]


@pytest.mark.slow
@pytest.mark.parametrize("call, fragment", ASK_ROWS)
def test_bad_ask(chat, call, fragment):
    raises_keeping_history(chat, call, fragment)


COMPLETE_ROWS = [
    ([], "complete() got an empty message list"),
    ("Hi", "complete() takes a list of messages"),
    ({"role": "user", "content": "Hi"}, "complete() takes a list of messages"),
    (None, "complete() takes a list of messages"),
    (["Hi"], "messages[0] is a str, not a dict"),
    ([{"content": "Hi"}], "messages[0] has no 'role'"),
    ([{"role": "user"}], "messages[0] has no 'content'"),
    ([{"role": "human", "content": "Hi"}],
     "messages[0]['role']='human': use 'system', 'user' or 'assistant'"),
    ([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "x"}], "messages[1]['role']='bot'"),
    ([{"role": "user", "content": None}], "messages[0]['content'] is NoneType, not text"),
    ([{"role": "user", "content": ["Hi"]}], "messages[0]['content'] is list, not text"),
    ([{"role": "user", "content": "word " * 5000}], "more than the 4096-token context"),
]


@pytest.mark.slow
@pytest.mark.parametrize("messages, fragment", COMPLETE_ROWS)
def test_bad_complete(chat, messages, fragment):
    raises_keeping_history(chat, lambda s: s.complete(messages), fragment)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_a_system_prompt_over_the_budget_is_named(tiny_model, stream):
    s = ChatSession.load(tiny_model, system_prompt="Answer in rhyme. " * 60, context_tokens=128,
                         max_new_tokens=16)
    s.on_notice = pytest.fail  # the message is not to blame: no "only its end is sent" notice
    call = (lambda s: list(s.ask("Hi", stream=True))) if stream else (lambda s: s.ask("Hi"))
    raises_keeping_history(s, call, "The system prompt is about ")
    with pytest.raises(CourseError, match=r"shorten system_prompt by at least \d+ tokens"):
        s.ask("Hi")


@pytest.mark.slow
def test_a_broken_history_is_named_before_generating(chat):
    chat.history.append({"role": "user", "content": None})
    raises_keeping_history(chat, lambda s: s.ask("Hi"), "history[2]['content'] is NoneType, not text")


@pytest.mark.slow
def test_bad_system_prompt_and_generation_types(tiny_model, chat):
    with pytest.raises(CourseError, match=re.escape("system_prompt=['Be brief.']: use a string")):
        ChatSession.load(tiny_model, system_prompt=["Be brief."])
    with pytest.raises(CourseError, match="generation= takes a Generation"):
        ChatSession(chat.backend, generation={"temperature": 0.5})
    chat.system_prompt = 42  # set after construction: still caught before generating
    raises_keeping_history(chat, lambda s: s.ask("Hi"), "system_prompt=42: use a string")


# ---- a call that fails part-way leaves no trace in the history ----------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_an_unreachable_server_leaves_the_history_unchanged(stream):
    s = ChatSession.remote(nowhere(), model="m", max_new_tokens=4)
    s.on_notice = lambda msg: None
    s.history = copy.deepcopy(HISTORY)
    call = (lambda s: list(s.ask("Hi", stream=True))) if stream else (lambda s: s.ask("Hi"))
    raises_keeping_history(s, call, "Cannot reach the chat server at http://127.0.0.1:")


class BreaksMidway:
    """A backend (the course's own protocol) whose generation fails after two chunks."""

    context_tokens = 1000

    def count_tokens(self, messages):
        return sum(len(m["content"].split()) + 2 for m in messages)

    def clip_text(self, text, max_tokens):
        return text

    def stream(self, messages, gen, stop):
        yield "one "
        yield "two "
        raise CourseError("the model crashed")


@pytest.mark.parametrize("stream", [False, True])
def test_a_failure_mid_reply_leaves_the_history_unchanged(stream):
    s = ChatSession(BreaksMidway(), generation=Generation(max_new_tokens=8), on_notice=lambda m: None)
    s.history = copy.deepcopy(HISTORY)
    call = (lambda s: list(s.ask("Hi", stream=True))) if stream else (lambda s: s.ask("Hi"))
    raises_keeping_history(s, call, "the model crashed")


# ---- building sessions ---------------------------------------------------------------------------

SESSION_ROWS = [
    # Names and folders are checked by models.resolve (its messages), before anything loads.
    (lambda t: ChatSession.load(""), "pass a registry name"),
    (lambda t: ChatSession.load("   "), "pass a registry name"),
    (lambda t: ChatSession.load(42), "pass a registry name"),
    (lambda t: ChatSession.load(t[:1]), "model= is a tuple of 1: pass (model, tokenizer)"),
    (lambda t: ChatSession.load(t[::-1]), "needs the model (with generate()) first"),
    (lambda t: ChatSession.load(t, context_tokens=0), "context_tokens=0: use a whole number of tokens"),
    (lambda t: ChatSession.load(t, context_tokens="2048"), "context_tokens='2048': use a whole number"),
    (lambda t: ChatSession.load(t, context_tokens=100_000),
     "context_tokens=100000 is more than this model's 8192-token limit"),
    (lambda t: ChatSession.load(t, context_tokens=128, max_new_tokens=256),
     "max_new_tokens=256 leaves no room for the prompt in a 128-token context"),
    (lambda t: ChatSession.remote("127.0.0.1:23333", model="m"),
     "url='127.0.0.1:23333': pass the server's address"),
    (lambda t: ChatSession.remote("", model="m"), "url='': pass the server's address"),
    (lambda t: ChatSession.remote(None, model="m"), "url=None: pass the server's address"),
    (lambda t: ChatSession.remote(nowhere(), model=""), "model='': pass the name the server serves"),
    (lambda t: ChatSession.remote(nowhere(), model=7), "model=7: pass the name the server serves"),
    (lambda t: ChatSession.remote(nowhere(), model="m", api_key=123), "api_key is a int: use a string"),
    (lambda t: ChatSession.remote(nowhere(), model="m", context_tokens=-1),
     "context_tokens=-1: use a whole number"),
    (lambda t: ChatSession.remote(nowhere(), model="m", context_tokens=64, max_new_tokens=256),
     "max_new_tokens=256 leaves no room for the prompt in a 64-token context"),
    (lambda t: ChatSession.remote(nowhere()), "Cannot list models at http://127.0.0.1:"),
]


@pytest.mark.slow
@pytest.mark.parametrize("call, fragment", SESSION_ROWS)
def test_bad_session_arguments(tiny_model, call, fragment):
    with pytest.raises(CourseError, match=re.escape(fragment)):
        call(tiny_model)


# ---- write_story, count_words, cli_chat ----------------------------------------------------------

STORY_ROWS = [
    (dict(topic=""), "topic='': say what the story is about"),
    (dict(topic=None), "topic=None: say what the story is about"),
    (dict(min_words=0), "min_words=0: use a whole number above 0"),
    (dict(min_words="300"), "min_words='300': use a whole number above 0"),
    (dict(max_rounds=0), "max_rounds=0: use a whole number, 1 or more"),
    (dict(language="fr"), "language='fr': use 'en', 'zh' or 'auto'"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kwargs, fragment", STORY_ROWS)
def test_bad_write_story_fails_before_asking(chat, kwargs, fragment):
    args = {"topic": "a brave robot", **kwargs}
    raises_keeping_history(chat, lambda s: write_story(s, **args), fragment)


def test_count_words_needs_text():
    with pytest.raises(CourseError, match=re.escape("count_words() needs text (a string), not NoneType")):
        count_words(None)


@pytest.mark.slow
def test_cli_chat_inputs_must_be_a_list_not_one_string(chat):
    raises_keeping_history(chat, lambda s: cli_chat(s, "Hi"), "inputs= takes a list of messages")


# ---- serve: every argument checked before a server process starts --------------------------------

@pytest.fixture
def no_launch(monkeypatch, tmp_path):
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path))

    def launch(*args, **kwargs):
        pytest.fail("a server process was started for arguments that should have been refused")

    monkeypatch.setattr(serving, "_launch", launch)


SERVE_ROWS = [
    (dict(port=70000), "port=70000: use a whole number from 1 to 65535, or port=0 for any free port"),
    (dict(port=-1), "port=-1: use a whole number from 1 to 65535"),
    (dict(port="8000"), "port='8000': use a whole number from 1 to 65535"),
    (dict(port=8000.0), "port=8000.0: use a whole number from 1 to 65535"),
    (dict(port=True), "port=True: use a whole number from 1 to 65535"),
    (dict(port=None), "port=None: use a whole number from 1 to 65535"),
    (dict(host=""), "host='': use '127.0.0.1'"),
    (dict(host=None), "host=None: use '127.0.0.1'"),
    (dict(host="http://127.0.0.1"), "host='http://127.0.0.1' is a URL: pass only the address"),
    (dict(host="192.0.2.1"), "host='192.0.2.1' is not an address of this machine"),
    (dict(backend="vllm"), "backend='vllm': use one of auto, lmdeploy, transformers"),
    (dict(timeout=0), "timeout=0: use the seconds to wait for the server, a number above 0"),
    (dict(timeout=-5), "timeout=-5: use the seconds to wait"),
    (dict(timeout="60"), "timeout='60': use the seconds to wait"),
    (dict(model=""), "pass a registry name"),  # was: the default model, served without a word
    (dict(model=123), "pass a registry name"),
    (dict(extra_args="--log-level INFO"), "extra_args='--log-level INFO': pass a list of words"),
    (dict(backend="transformers", quantization="4bit"),
     "quantization='4bit': transformers serve takes None, 'bnb-4bit' or 'bnb-8bit'"),
    (dict(api_key=123), "api_key is a int: use a string"),
    (dict(host="localhost:8000"),
     "host='localhost:8000' includes a port: pass host='localhost' and port=8000"),
]


@pytest.mark.parametrize("kwargs, fragment", SERVE_ROWS)
def test_bad_serve_arguments_fail_before_any_server_starts(no_launch, kwargs, fragment):
    start = time.perf_counter()
    with pytest.raises(CourseError, match=re.escape(fragment)):
        serving.serve(**kwargs)
    assert time.perf_counter() - start < 10  # no start-up wait (the old port=0 waited 180 s)


def test_bad_lmdeploy_tp_and_port_checks():
    with pytest.raises(CourseError, match=re.escape("tp=0: the number of GPUs")):
        serving.lmdeploy_command("m", model_name="m", tp=0)
    with pytest.raises(CourseError, match=re.escape("port=70000: use a whole number")):
        serving.port_in_use(70000)


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_ipv6_loopback_is_checked_as_ipv6(no_launch):
    port = serving.free_port("::1")
    assert not serving.port_in_use(port, "::1")
    server = serving.Server("transformers", "m", "::1", port, log_path=None)
    assert server.url == f"http://[::1]:{port}"
    with socket.socket(socket.AF_INET6) as sock:  # taken on ::1: the real reason, named
        sock.bind(("::1", 0))
        sock.listen()
        taken = sock.getsockname()[1]
        with pytest.raises(CourseError, match=re.escape(f"Port {taken} on ::1 is already in use")):
            serving.serve(host="::1", port=taken, backend="transformers")


@pytest.mark.slow
def test_port_0_serves_on_a_free_port(tmp_path, monkeypatch):
    """One real server: port=0 picks a free port (on IPv6 loopback where the machine has one), and
    a request the server refuses leaves the session's history as it was."""
    monkeypatch.setenv("COURSE_OUTPUT_DIR", str(tmp_path))
    host = "::1" if _has_ipv6_loopback() else "127.0.0.1"
    with serving.serve("smollm2-135m-instruct", port=0, host=host, timeout=150) as server:
        assert server.running and server.port > 0 and server.host == host
        s = ChatSession.remote(server, max_new_tokens=4)
        assert s.ask("Say hi.") and len(s.history) == 2
        wrong = ChatSession.remote(server, model="no-such-model", max_new_tokens=4)
        wrong.history = copy.deepcopy(HISTORY)
        raises_keeping_history(wrong, lambda w: w.ask("Hi"), "The chat server at ")
    assert not server.running
