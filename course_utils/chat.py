"""Chat with a local model or an OpenAI-compatible endpoint, in code or in a Jupyter widget.

The chat protocol other lessons build on: an object with ``ask(text, stream=False)``,
``stop()``, ``reset()``, ``history`` (a list of ``{"role", "content"}`` dicts) and
``complete(messages, **gen)``. ``ChatSession`` implements it; ``ChatWidget`` drives any object
that does.
"""

from __future__ import annotations

import functools
import re
import sys
import threading
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import CourseError, is_number, is_whole

_ROLES = ("system", "user", "assistant")
_MIN_PROMPT = 16  # tokens: with less room than this no message fits beside the chat template
# The names other libraries use for a setting, so an "unknown setting" error can say ours.
_ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
            "max_length": "max_new_tokens"}


@dataclass
class Generation:
    """Generation settings; ``temperature == 0`` means greedy (reproducible) decoding."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1  # small models loop without it

    def __post_init__(self):
        # Every way to set these (Generation(...), load()/remote() keywords, per-call overrides via
        # _merge, the widget's sliders) builds a Generation, so this is the one check, and it runs
        # before any generation: transformers would otherwise fail mid-call or, worse, accept
        # nonsense (a negative temperature meant greedy, top_p=5 no cut at all).
        if not is_whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise CourseError(f"max_new_tokens={self.max_new_tokens!r:.40}: use a whole number of "
                              "tokens to generate, 1 or more (e.g. max_new_tokens=256).")
        # 2 is what OpenAI-compatible servers (LMDeploy) accept; the same session code runs on both.
        if not is_number(self.temperature) or not 0 <= self.temperature <= 2:
            raise CourseError(f"temperature={self.temperature!r:.40}: use a number from 0 to 2 (0 = "
                              "greedy, the same reply every time; about 0.7 for varied replies).")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise CourseError(f"top_p={self.top_p!r:.40}: use a number above 0 and at most 1 (1 = no "
                              "cut; 0.8 samples only from the likeliest tokens that make up 80%).")
        if not is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise CourseError(f"repetition_penalty={self.repetition_penalty!r:.40}: use a number above "
                              "0 (1.0 = no penalty; 1.1 keeps small models from looping).")
        # Plain Python numbers: numpy's int64/float32 (a notebook's sweep) break the JSON request.
        self.max_new_tokens = int(self.max_new_tokens)
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.repetition_penalty = float(self.repetition_penalty)


def default_generation() -> Generation:
    """Greedy in the tiny profile (stored outputs must be reproducible), sampled on a GPU."""
    from .env import profile

    return Generation() if profile() == "tiny" else Generation(temperature=0.7, top_p=0.8,
                                                             repetition_penalty=1.0)


def _merge(base: Generation, overrides: dict) -> Generation:
    """``base`` with ``overrides``, checked (a new Generation, so also a base changed by hand)."""
    if not isinstance(base, Generation):
        raise CourseError(f"generation= takes a Generation(...), not a {type(base).__name__}: e.g. "
                          "Generation(temperature=0.7), or pass the settings as keywords "
                          "(ChatSession.load(..., temperature=0.7)).")
    known = {f.name for f in fields(Generation)}
    unknown = set(overrides) - known
    if unknown:
        hint = "".join(f" ({name} is called {_ALIASES[name]} here)" for name in sorted(unknown)
                       if name in _ALIASES)
        raise CourseError(f"Unknown generation setting(s) {sorted(unknown)}; use {sorted(known)}.{hint}")
    return replace(base, **overrides)


def _check_budget(context_tokens: int, gen: Generation) -> None:
    if context_tokens - gen.max_new_tokens < _MIN_PROMPT:
        raise CourseError(f"max_new_tokens={gen.max_new_tokens} leaves no room for the prompt in a "
                          f"{context_tokens}-token context: lower max_new_tokens, or raise "
                          "context_tokens.")


def _check_context_tokens(value, limit: int | None = None) -> None:
    if value is None:
        return
    if not is_whole(value) or value < 1:
        raise CourseError(f"context_tokens={value!r}: use a whole number of tokens the model sees at "
                          "once (prompt + reply), e.g. 2048, or None for the default.")
    if limit and value > limit:
        raise CourseError(f"context_tokens={value} is more than this model's {limit}-token limit "
                          f"(max_position_embeddings in its config.json): use at most {limit}, or "
                          "None.")


def _check_system_prompt(value) -> None:
    if value is not None and not isinstance(value, str):
        raise CourseError(f"system_prompt={value!r:.80}: use a string (or None for no system prompt).")


def _check_messages(messages: list, name: str) -> None:
    """Each item a ``{"role", "content"}`` dict the chat template can render."""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise CourseError(f"{name}[{i}] is a {type(message).__name__}, not a dict: each message "
                              "is {'role': 'user', 'content': '...'}.")
        if "role" not in message:
            raise CourseError(f"{name}[{i}] has no 'role': add 'role': 'user' (or 'system' / "
                              "'assistant').")
        if message["role"] not in _ROLES:
            raise CourseError(f"{name}[{i}]['role']={message['role']!r:.40}: use 'system', 'user' "
                              "or 'assistant'.")
        if "content" not in message:
            raise CourseError(f"{name}[{i}] has no 'content': add the message text as 'content'.")
        if not isinstance(message["content"], str):
            raise CourseError(f"{name}[{i}]['content'] is {type(message['content']).__name__}, not "
                              "text: pass the message as a string.")


class _LocalBackend:
    """Generation with a transformers model, streamed through ``TextIteratorStreamer``."""

    def __init__(self, model, tokenizer, context_tokens: int):
        self.model, self.tokenizer, self.context_tokens = model, tokenizer, context_tokens

    def count_tokens(self, messages: list[dict]) -> int:
        return len(self._encode(messages))

    def _encode(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def clip_text(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.decode(ids[-max_tokens:]) if max_tokens > 0 else ""

    def _generate_kwargs(self, messages: list[dict], gen: Generation, stop: threading.Event,
                         streamer) -> dict:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopOnEvent(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # one flag per batch row
                return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        input_ids = torch.tensor([self._encode(messages)], device=self.model.device)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      streamer=streamer, max_new_tokens=gen.max_new_tokens,
                      repetition_penalty=gen.repetition_penalty,
                      stopping_criteria=StoppingCriteriaList([StopOnEvent()]),
                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        if gen.temperature > 0:
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
        else:  # greedy; unset the sampling knobs a model's generation_config may carry
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def stream(self, messages: list[dict], gen: Generation, stop: threading.Event) -> Iterator[str]:
        import torch
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = self._generate_kwargs(messages, gen, stop, streamer)
        errors: list[BaseException] = []

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            stop.set()  # the consumer left early: let generate() finish its current step
            thread.join()
        if errors:
            raise errors[0]


class _RemoteBackend:
    """Generation through an OpenAI-compatible ``/v1/chat/completions`` endpoint."""

    def __init__(self, client, model: str, context_tokens: int):
        self.client, self.model, self.context_tokens = client, model, context_tokens

    def count_tokens(self, messages: list[dict]) -> int:
        # No tokenizer on this side: ~4 characters per token, plus a few per message for the template.
        return sum(len(m["content"]) // 4 + 4 for m in messages)

    def clip_text(self, text: str, max_tokens: int) -> str:
        return text[-max_tokens * 4:] if max_tokens > 0 else ""

    def stream(self, messages: list[dict], gen: Generation, stop: threading.Event) -> Iterator[str]:
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, stream=True, max_tokens=gen.max_new_tokens,
                temperature=gen.temperature, top_p=gen.top_p)
        except openai.APIConnectionError as exc:
            raise CourseError(f"Cannot reach the chat server at {self.client.base_url}: start it "
                              "(serving.serve) or check the URL.") from exc
        except openai.AuthenticationError as exc:
            raise CourseError(f"The chat server at {self.client.base_url} refused the API key: pass "
                              "api_key= (the key it was started with) to ChatSession.remote.") from exc
        except openai.APIStatusError as exc:
            raise CourseError(f"The chat server at {self.client.base_url} refused the request (HTTP "
                              f"{exc.status_code}) for model {self.model!r}: check model= against its "
                              "/v1/models list; its log says why (Server.log_tail()).") from exc
        try:
            for chunk in response:
                if stop.is_set():
                    break
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except openai.APIError as exc:
            raise CourseError(f"The chat server at {self.client.base_url} broke off the reply "
                              f"({type(exc).__name__}): read its log (Server.log_tail()), then ask "
                              "again.") from exc
        finally:
            response.close()


class ChatSession:
    """A conversation: history, system prompt, chat template, context budget and streaming."""

    def __init__(self, backend, *, system_prompt: str | None = None,
                 generation: Generation | None = None, on_notice: Callable[[str], None] | None = None):
        _check_system_prompt(system_prompt)
        self.backend = backend
        self.system_prompt = system_prompt
        self.generation = default_generation() if generation is None else _merge(generation, {})
        self.history: list[dict] = []
        self.notices: list[str] = []
        self.on_notice = on_notice or (lambda msg: print(msg, file=sys.stderr))
        self._stop = threading.Event()

    @classmethod
    def load(cls, model=None, *, adapter: str | Path | None = None, system_prompt: str | None = None,
             context_tokens: int | None = None, **generation) -> "ChatSession":
        """A session over a local model: the profile's, a registry name, a folder, or ``(model, tokenizer)``."""
        from .models import load_model, read_config, resolve

        # Everything is checked before the (slow) model load; the context limit comes from
        # config.json, which needs no load.
        _check_context_tokens(context_tokens)
        _check_system_prompt(system_prompt)
        gen = _merge(default_generation(), generation)
        if adapter is not None:
            _check_adapter(adapter)
        if isinstance(model, tuple):
            _check_model_pair(model)
            limit = getattr(model[0].config, "max_position_embeddings", None)
        else:
            model = resolve(model)  # names and folders are checked there
            limit = read_config(model).get("max_position_embeddings")
        _check_context_tokens(context_tokens, limit)
        context = context_tokens or min(limit or 2048, 4096)
        _check_budget(context, gen)
        mdl, tok = model if isinstance(model, tuple) else load_model(model)
        if adapter is not None:
            mdl = _with_adapter(mdl, adapter)
        return cls(_LocalBackend(mdl, tok, context), system_prompt=system_prompt, generation=gen)

    @classmethod
    def remote(cls, url, model: str | None = None, *, api_key: str | None = None,
               system_prompt: str | None = None, context_tokens: int = 4096,
               **generation) -> "ChatSession":
        """A session over an OpenAI-compatible server: a URL (``http://127.0.0.1:23333/v1``) or a
        ``serving.Server`` (its model name and key are then used)."""
        import openai

        if hasattr(url, "base_url"):  # a serving.Server
            model, api_key, url = model or url.model, api_key or url.api_key, url.base_url
        if not isinstance(url, str) or not url.strip().startswith(("http://", "https://")):
            raise CourseError(f"url={url!r:.80}: pass the server's address with http://, e.g. "
                              "'http://127.0.0.1:23333/v1', or the Server that serving.serve() "
                              "returned.")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise CourseError(f"model={model!r:.80}: pass the name the server serves (Server.model, or "
                              "one from its /v1/models list), or leave model out to use the server's "
                              "first model.")
        if api_key is not None and not isinstance(api_key, str):  # no repr: it may be a secret
            raise CourseError(f"api_key is a {type(api_key).__name__}: use a string (the key the "
                              "server was started with), or None.")
        _check_context_tokens(context_tokens)
        _check_system_prompt(system_prompt)
        gen = _merge(default_generation(), generation)
        context = context_tokens or 4096
        _check_budget(context, gen)
        url = url.strip().rstrip("/")
        base = url if url.endswith("/v1") else f"{url}/v1"
        client = openai.OpenAI(base_url=base, api_key=api_key or "EMPTY", max_retries=0)
        if model is None:
            try:
                model = client.models.list().data[0].id
            except (openai.APIConnectionError, IndexError) as exc:
                raise CourseError(f"Cannot list models at {base}: is the server running? "
                                  "Or pass model= explicitly.") from exc
            except openai.AuthenticationError as exc:
                raise CourseError(f"The server at {base} refused the API key: pass api_key= (the "
                                  "key it was started with).") from exc
            except openai.APIStatusError as exc:
                raise CourseError(f"The server at {base} answered HTTP {exc.status_code} to GET "
                                  "/models: check the URL (the server's address, ending in /v1), "
                                  "or pass model= explicitly.") from exc
        backend = _RemoteBackend(client, model, context)
        return cls(backend, system_prompt=system_prompt, generation=gen)

    def messages(self, history: list[dict] | None = None) -> list[dict]:
        """The message list sent to the model: system prompt first, then ``history``."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + list(self.history if history is None else history)

    def _notice(self, msg: str) -> None:
        self.notices.append(msg)
        self.on_notice(msg)

    def _fit(self, history: list[dict], gen: Generation) -> list[dict]:
        """Drop the oldest turns (then clip the last message) until prompt + reply fit the context."""
        _check_budget(self.backend.context_tokens, gen)
        budget = self.backend.context_tokens - gen.max_new_tokens
        if self.system_prompt:
            # Clipping the message cannot help when the system prompt alone fills the budget.
            system = self.backend.count_tokens(self.messages([]))
            if system > budget - _MIN_PROMPT:
                raise CourseError(
                    f"The system prompt is about {system} tokens, too long for the {budget}-token "
                    f"prompt budget (context_tokens={self.backend.context_tokens} minus "
                    f"max_new_tokens={gen.max_new_tokens}) with room left for the message: shorten "
                    f"system_prompt by at least {system - budget + _MIN_PROMPT} tokens, lower "
                    "max_new_tokens, or raise context_tokens.")
        history, dropped = list(history), 0
        while len(history) > 1 and self.backend.count_tokens(self.messages(history)) > budget:
            history.pop(0)
            dropped += 1
            while len(history) > 1 and history[0]["role"] != "user":  # start on a user turn
                history.pop(0)
                dropped += 1
        if dropped:
            self._notice(f"[notice] The conversation outgrew the {budget}-token budget: the "
                         f"{dropped} oldest message(s) are left out of the prompt.")
        excess = self.backend.count_tokens(self.messages(history)) - budget
        if excess > 0:
            last = history[-1]
            keep = self.backend.count_tokens([last]) - excess - 8
            history[-1] = {**last, "content": self.backend.clip_text(last["content"], keep)}
            self._notice(f"[notice] The message is longer than the {budget}-token budget: only "
                         "its end is sent.")
        return history

    def _stream(self, messages: list[dict], gen: Generation) -> Iterator[str]:
        self._stop.clear()
        return self.backend.stream(messages, gen, self._stop)

    def ask(self, text: str, stream: bool = False, **gen) -> str | Iterator[str]:
        """Send ``text``; returns the reply, or with ``stream=True`` an iterator of text chunks."""
        if not isinstance(text, str) or not text.strip():
            raise CourseError(f"ask() needs the message as a non-empty string, not {text!r:.60}.")
        if not isinstance(stream, bool):  # ask(text, 200) reads as a length but means stream=True
            raise CourseError(f"stream={stream!r:.40}: use True or False; pass generation settings "
                              "by name, e.g. ask(text, max_new_tokens=200).")
        settings = _merge(self.generation, gen)
        _check_system_prompt(self.system_prompt)
        _check_messages(self.history, "history")
        user = {"role": "user", "content": text}
        # Fitted here, not on the first next(): with stream=True a bad prompt fails at the call.
        prompt = self.messages(self._fit(self.history + [user], settings))
        chunks = self._ask_stream(user, prompt, settings)
        return chunks if stream else "".join(chunks).strip()

    def _ask_stream(self, user: dict, prompt: list[dict], gen: Generation) -> Iterator[str]:
        # The turn goes into the history only when the reply ends: finished, stop(), or the
        # consumer leaving the loop (GeneratorExit) keep the (partial) reply; an error keeps
        # nothing, so a retry does not send a dangling question or an empty answer.
        parts: list[str] = []
        failed = False
        try:
            for piece in self._stream(prompt, gen):
                parts.append(piece)
                yield piece
        except BaseException as exc:
            failed = not isinstance(exc, GeneratorExit)
            raise
        finally:
            if not failed:
                self.history += [user, {"role": "assistant", "content": "".join(parts).strip()}]

    def stop(self) -> None:
        """End a running generation early; the partial reply stays in the history."""
        self._stop.set()

    def reset(self) -> None:
        """Forget the conversation (the system prompt and settings stay)."""
        self.history.clear()

    def complete(self, messages: list[dict], **gen) -> str:
        """A stateless reply to ``messages`` (the session's history is not touched)."""
        if not isinstance(messages, list):
            raise CourseError(f"complete() takes a list of messages, e.g. [{{'role': 'user', "
                              f"'content': 'Hi'}}], not a {type(messages).__name__}: wrap one "
                              "message in [...], or use ask(text) for a chat turn.")
        if not messages:
            raise CourseError("complete() got an empty message list: pass at least one message, "
                              "e.g. [{'role': 'user', 'content': 'Hi'}].")
        _check_messages(messages, "messages")
        settings = _merge(self.generation, gen)
        _check_budget(self.backend.context_tokens, settings)
        # No trimming here (the caller chose these messages), so an overflow is the caller's to fix.
        size = self.backend.count_tokens(messages)
        over = size + settings.max_new_tokens - self.backend.context_tokens
        if over > 0:
            raise CourseError(f"The messages are about {size} tokens; with max_new_tokens="
                              f"{settings.max_new_tokens} that is {over} more than the "
                              f"{self.backend.context_tokens}-token context: send fewer or shorter "
                              "messages, or lower max_new_tokens.")
        return "".join(self._stream(list(messages), settings)).strip()


def _check_model_pair(pair: tuple) -> None:
    if len(pair) != 2:
        raise CourseError(f"model= is a tuple of {len(pair)}: pass (model, tokenizer) as "
                          "load_model() returns it, a registry name, a model folder, or None for "
                          "the profile's model.")
    if not hasattr(pair[0], "generate") or not hasattr(pair[1], "apply_chat_template"):
        raise CourseError("model=(model, tokenizer) needs the model (with generate()) first and its "
                          "tokenizer second, in that order, as load_model() returns them.")


def _check_adapter(adapter: str | Path) -> None:
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise CourseError(f"{folder} has no adapter_config.json: pass the folder a LoRA run saved "
                          "(finetune output), not the base model.")


def _with_adapter(model, adapter: str | Path):
    """Put a PEFT (LoRA) adapter folder on top of ``model``."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, Path(adapter)).eval()


# ---- a CLI-style loop and the homework story -----------------------------------------------------

def cli_chat(session, inputs: Iterable[str] | None = None, *, quit_words=("exit", "quit")) -> None:
    """The tutorials' terminal chat loop; ``inputs`` replaces ``input()`` so it can run unattended."""
    if isinstance(inputs, str):  # iterating it would send one character per turn
        raise CourseError(f"inputs= takes a list of messages, e.g. ['Hi', 'exit'], not one string: "
                          f"write inputs=[{inputs!r:.40}].")
    source = iter(inputs) if inputs is not None else iter(lambda: input("User  >>> "), None)
    for text in source:
        if not isinstance(text, str):
            raise CourseError(f"inputs holds a {type(text).__name__} ({text!r:.40}): each input is "
                              "one message string.")
        if inputs is not None:
            print(f"User  >>> {text}")
        if not text.strip():  # Enter on an empty line: ask again rather than end the chat
            continue
        if text.strip().lower() in quit_words:
            print("Bye.")
            return
        print("Robot >>> ", end="", flush=True)
        for piece in session.ask(text, stream=True):
            print(piece, end="", flush=True)
        print()


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[A-Za-z0-9]+(?:['’-][A-Za-z0-9]+)*")


def _check_language(language) -> None:
    if language not in ("auto", "en", "zh"):
        raise CourseError(f"language={language!r:.40}: use 'en', 'zh' or 'auto'.")


def count_words(text: str, language: str = "auto") -> int:
    """English words; for Chinese text, characters plus any English words, as Chinese word
    processors count ("auto" picks the language by which dominates)."""
    if not isinstance(text, str):
        raise CourseError(f"count_words() needs text (a string), not {type(text).__name__}.")
    _check_language(language)
    cjk, words = len(_CJK.findall(text)), len(_WORD.findall(text))
    if language == "auto":
        language = "zh" if cjk > words else "en"
    return cjk + words if language == "zh" else words


@dataclass
class Story:
    text: str
    length: int  # words (en) or characters (zh)
    rounds: int  # model calls it took


def write_story(session, topic: str, min_words: int = 300, *, language: str = "auto",
                max_rounds: int = 8) -> Story:
    """Ask for a story about ``topic`` and keep asking to continue until it has ``min_words``."""
    # All checked before the first (slow) model call, which a bad value would otherwise waste.
    if not isinstance(topic, str) or not topic.strip():
        raise CourseError(f"topic={topic!r:.60}: say what the story is about, e.g. "
                          "write_story(chat, 'a brave robot').")
    if not is_whole(min_words) or min_words < 1:
        raise CourseError(f"min_words={min_words!r:.40}: use a whole number above 0, e.g. 300.")
    if not is_whole(max_rounds) or max_rounds < 1:
        raise CourseError(f"max_rounds={max_rounds!r:.40}: use a whole number, 1 or more (each "
                          "round is one model call).")
    _check_language(language)
    if language == "auto":
        language = "zh" if _CJK.search(topic) else "en"
    first = (f"请写一个关于「{topic}」的故事，不少于 {min_words} 字。" if language == "zh" else
             f"Write a story about {topic}. Make it at least {min_words} words long.")
    more = "请接着写下去。" if language == "zh" else "Continue the story from where it stopped."
    parts = [session.ask(first)]
    while count_words("\n\n".join(parts), language) < min_words and len(parts) < max_rounds:
        parts.append(session.ask(more))
    text = "\n\n".join(p for p in parts if p)
    return Story(text, count_words(text, language), len(parts))


# ---- the widget ----------------------------------------------------------------------------------

@functools.cache
def _markdown():
    import mistune  # ships with nbconvert; renders the reply (and any appended sources) as Markdown

    return mistune.create_markdown(escape=True)  # a reply's raw HTML is shown, not run


def _markdown_html(text: str) -> str:
    return _markdown()(text)


class ChatWidget:
    """An ipywidgets chat (input, Send, Stop, Clear, sliders, streamed Markdown) for any chat session."""

    def __init__(self, session, *, title: str = "Chat", height: str = "480px"):
        import ipywidgets as w

        self.session = session
        # flex "0 0 auto": the log keeps its full height inside the scrolling box (ipywidgets lets a box's
        # children shrink, and a shrunk log spills its messages past the box instead of scrolling).
        # overflow "visible": ipywidgets gives every box overflow auto, which would make the log the
        # sticky question's scroll container, so it would never stick.
        self.log = w.VBox(layout=w.Layout(flex="0 0 auto", overflow="visible"))
        # The log reads top to bottom, oldest first. The box around it grows with the conversation up
        # to ``height`` (a short chat shows whole, with no empty band above it); past that, its
        # column-reverse flow keeps the scroll pinned to the newest message without JavaScript, and
        # the question being answered sticks to the top of the box (``_STYLE``), so a long reply
        # never scrolls its own question out of sight.
        # ``overflow``, not ``overflow_y``: ipywidgets 8 dropped overflow_x/y and ignores them silently
        # (the box then never scrolled: older messages spilled out of its top, hidden by the cell).
        scroller = w.Box([self.log], layout=w.Layout(max_height=height, overflow="auto",
                                                     padding="4px", border="1px solid #ddd",
                                                     flex_flow="column-reverse"))
        scroller.add_class("course-chat-scroller")
        self.text = w.Textarea(placeholder="Type a message, then Send", rows=2,
                               layout=w.Layout(width="100%"))
        self.send_button = w.Button(description="Send", button_style="primary")
        self.stop_button = w.Button(description="Stop", disabled=True)
        self.clear_button = w.Button(description="Clear")
        gen = getattr(session, "generation", None)
        label = {"description_width": "initial"}  # the default width cuts "temperature" short
        self.temperature = w.FloatSlider(value=getattr(gen, "temperature", 0.0), min=0.0, max=1.5,
                                         step=0.05, description="temperature", style=label)
        self.max_tokens = w.IntSlider(value=getattr(gen, "max_new_tokens", 256), min=16, max=2048,
                                      step=16, description="max tokens", style=label)
        if gen is None:  # a session-like object without settings: the sliders would do nothing
            self.temperature.disabled = self.max_tokens.disabled = True
        self.status = w.HTML()
        self.send_button.on_click(lambda _: self.submit(self.text.value, wait=False))
        self.stop_button.on_click(lambda _: self.session.stop())
        self.clear_button.on_click(lambda _: self.clear())
        buttons = w.HBox([self.send_button, self.stop_button, self.clear_button])
        self.view = w.VBox([w.HTML(f"<b>{title}</b>{self._STYLE}"), scroller, self.text, buttons,
                            w.HBox([self.temperature, self.max_tokens]), self.status])
        # Stable names for styling and for the browser tests (labels may be translated).
        for part, name in [(self.view, "chat"), (self.log, "log"), (self.text, "input"),
                           (self.send_button, "send"), (self.stop_button, "stop"),
                           (self.clear_button, "clear"), (self.temperature, "temperature"),
                           (self.max_tokens, "max-tokens"), (self.status, "status")]:
            part.add_class("course-chat" if name == "chat" else f"course-chat-{name}")
        self._thread: threading.Thread | None = None
        self.last_reply = ""

    # ipywidgets' Layout has no ``position``: a style element in the title carries the sticky rule.
    _STYLE = ("<style>.course-chat-current{position:sticky;top:0;z-index:1;"
              "background:var(--jp-layout-color0,#fff);border-bottom:1px solid #eee}</style>")

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.view._repr_mimebundle_(**kwargs)
        # The text form is what a notebook keeps for viewers without the widget manager.
        bundle["text/plain"] = "ChatWidget (run the notebook in Jupyter to chat)"
        return bundle

    @staticmethod
    def _bubble_html(role: str, text: str) -> str:
        who = "🧑 You" if role == "user" else "🤖 Assistant"
        return f"<div><b>{who}</b>{_markdown_html(text)}</div>"

    def _bubble(self, role: str, text: str):
        import ipywidgets as w

        bubble = w.HTML(self._bubble_html(role, text))
        bubble.add_class(f"course-chat-{role}")
        return bubble

    def _apply_settings(self) -> None:
        gen = getattr(self.session, "generation", None)
        if isinstance(gen, Generation):
            self.session.generation = replace(gen, temperature=self.temperature.value,
                                              max_new_tokens=self.max_tokens.value)

    def submit(self, text: str, *, wait: bool = True) -> str | None:
        """Send ``text`` as if typed and clicked; with ``wait`` returns the reply when it is done."""
        if not text.strip() or (self._thread and self._thread.is_alive()):
            return None
        self.text.value = ""
        self._apply_settings()
        # A click runs in a thread so the kernel stays free to receive the Stop click.
        self._thread = threading.Thread(target=self._run, args=(text,), daemon=True)
        self._thread.start()
        if wait:
            self._thread.join()
            return self.last_reply
        return None

    def _run(self, text: str) -> None:
        question = self._bubble("user", text)
        for earlier in self.log.children:  # only the newest question sticks to the top
            earlier.remove_class("course-chat-current")
        question.add_class("course-chat-current")
        self.log.children += (question, self._bubble("assistant", "…"))
        bubble, reply = self.log.children[-1], ""
        self.send_button.disabled, self.stop_button.disabled = True, False
        self.status.value = "generating…"
        try:
            for piece in self.session.ask(text, stream=True):
                reply += piece
                bubble.value = self._bubble_html("assistant", reply + " ▌")
            self.status.value = ""
        except Exception as exc:  # shown in the widget: a thread has nowhere else to report it
            self.status.value = f"<span style='color:#b00'>{type(exc).__name__}: {exc}</span>"
        bubble.value = self._bubble_html("assistant", reply)
        self.last_reply = reply
        self.send_button.disabled, self.stop_button.disabled = False, True

    def clear(self) -> None:
        """Empty the conversation, in the widget and in the session."""
        self.session.reset()
        self.log.children = ()
        self.status.value = ""

    def transcript(self) -> str:
        """The conversation so far as Markdown (what the widget shows)."""
        turns = getattr(self.session, "history", [])
        return "\n\n".join(f"**{m['role']}:** {m['content']}" for m in turns)
