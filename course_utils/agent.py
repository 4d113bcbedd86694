"""A Lagent 0.2.x ReAct agent that talks to a ``serving`` endpoint and runs Python in a sandbox.

Lagent's ``GPTAPI`` posts OpenAI-style requests with ``requests`` to one full URL
(``.../v1/chat/completions``) and only knows model names starting with "gpt", "internlm" or
"qwen"; ``transformers serve`` rejects its extra fields (``top_k``, ``n``...). ``_api_class``
adapts it to the plain OpenAI request that every compatible server accepts.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

from .errors import CourseError

SEARCH_KEY_ENV = "SERPER_API_KEY"  # lagent's GoogleSearch uses serper.dev
TOOL_NAME = "PythonInterpreter"  # the name InternLM2.5 was trained to call


@functools.cache
def _api_class():
    from lagent.llms import GPTAPI

    class OpenAICompatibleAPI(GPTAPI):
        """``GPTAPI`` sending only standard OpenAI fields, with the server's own model name."""

        def __init__(self, served_model: str, **kwargs):
            super().__init__(model_type="gpt-compatible", **kwargs)
            self.served_model = served_model

        def generate_request_data(self, model_type, messages, gen_params, json_mode=False):
            params = dict(gen_params)
            data = {"model": self.served_model, "messages": messages,
                    "max_tokens": min(params.get("max_new_tokens", 512), 4096),
                    "temperature": params.get("temperature", 0.0),
                    "top_p": params.get("top_p", 1.0)}
            if params.get("stop_words"):
                data["stop"] = params["stop_words"]
            penalty = params.get("repetition_penalty") or 1.0
            if penalty > 1.0:  # OpenAI's frequency_penalty 0 = no penalty; servers map it to 1 + x
                data["frequency_penalty"] = round(penalty - 1.0, 3)
            return {"content-type": "application/json"}, data

    return OpenAICompatibleAPI


def make_llm(server, *, model: str | None = None, api_key: str | None = None,
             temperature: float = 0.0, max_new_tokens: int = 384, repetition_penalty: float = 1.1):
    """A Lagent LLM for a ``serving.Server`` or a base URL like ``http://127.0.0.1:23333/v1``."""
    base = getattr(server, "base_url", server).rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    model = model or getattr(server, "model", None)
    if not model:
        raise CourseError("Pass model= (the name the server serves) when giving a URL.")
    return _api_class()(
        served_model=model, openai_api_base=f"{base}/chat/completions",
        key=api_key or getattr(server, "api_key", None) or "EMPTY", query_per_second=100,
        retry=1, max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0,
        repetition_penalty=repetition_penalty, stop_words=["Response:"])  # don't invent tool results


def strip_fences(text: str) -> str:
    match = re.search(r"```(?:python|py)?\s*\n(.*?)```", text, re.S)
    return (match.group(1) if match else text).strip().strip('"').strip()


@functools.cache
def _tool_class():
    from lagent.actions import BaseAction, tool_api
    from lagent.actions.parser import JsonParser, ParseError
    from lagent.schema import ActionReturn, ActionStatusCode

    class CodeOrJsonParser(JsonParser):
        """Accept ``{"command": "..."}`` as Lagent expects, or bare code as small models write it."""

        def parse_inputs(self, inputs, name="run"):
            try:
                return super().parse_inputs(inputs, name)
            except ParseError:
                return {"command": strip_fences(str(inputs))}

    class CourseSandboxPython(BaseAction):
        """Runs Python code in a sandbox and returns what it prints."""

        def __init__(self, timeout: float = 10, memory_mb: int = 1024, allow_unsandboxed: bool = False):
            from .sandbox import INSTALL_HINT, boundary_error

            why = boundary_error()
            if why is not None and not allow_unsandboxed:  # refuse now, not at the model's first call
                raise CourseError(f"The Python tool runs model-written code, and this machine has no "
                                  f"operating-system sandbox ({why}): {INSTALL_HINT}. If you accept "
                                  "that the code can read and change your files, pass "
                                  "allow_unsandboxed=True.")
            description = dict(self.__tool_description__, name=TOOL_NAME)
            super().__init__(description=description, parser=CodeOrJsonParser)
            self.timeout, self.memory_mb, self.unsandboxed = timeout, memory_mb, allow_unsandboxed

        @tool_api
        def run(self, command: str) -> ActionReturn:
            """Run Python 3 code in a sandbox (no network, no files outside a scratch folder) and
            return what it prints. Always print() the result; sympy and numpy are available.

            Args:
                command (str): the Python code to run
            """
            from .sandbox import run_python

            result = run_python(strip_fences(command), timeout=self.timeout,
                                memory_mb=self.memory_mb, unsandboxed=self.unsandboxed)
            ret = ActionReturn(args={"command": command}, type=self.name)
            if result.ok:
                ret.result = [{"type": "text", "content": result.output.strip() or "(no output)"}]
            else:
                ret.errmsg, ret.state = str(result), ActionStatusCode.API_ERROR
            return ret

    return CourseSandboxPython


def python_tool(timeout: float = 10, memory_mb: int = 1024, allow_unsandboxed: bool = False):
    """The sandboxed Python tool as a Lagent action named ``PythonInterpreter``.

    Without an OS sandbox on this machine it raises a CourseError unless ``allow_unsandboxed``.
    """
    return _tool_class()(timeout=timeout, memory_mb=memory_mb, allow_unsandboxed=allow_unsandboxed)


def search_tool(api_key: str | None = None):
    """Lagent's web search if a serper.dev key is set, else None with a one-line notice."""
    key = api_key or os.environ.get(SEARCH_KEY_ENV)
    if not key:
        print(f"Web search left out: set {SEARCH_KEY_ENV} (a serper.dev key) to add it.")
        return None
    from lagent.actions import GoogleSearch

    return GoogleSearch(api_key=key)


def make_agent(server, *, model: str | None = None, api_key: str | None = None,
               language: str | None = None, max_turn: int = 3, search: bool = True,
               allow_unsandboxed: bool = False, **llm_kwargs):
    """A ReAct agent with the sandboxed Python tool (and web search when a key is set).

    ``allow_unsandboxed``: see ``python_tool``; without an OS sandbox the agent is refused.
    """
    from lagent.actions import ActionExecutor
    from lagent.agents import ReAct
    from lagent.agents.react import (CALL_PROTOCOL_CN, CALL_PROTOCOL_EN, FORCE_STOP_PROMPT_CN,
                                     FORCE_STOP_PROMPT_EN, ReActProtocol)

    from .env import profile

    language = language or ("en" if profile() == "tiny" else "zh")
    tools = [python_tool(allow_unsandboxed=allow_unsandboxed)] + ([t] if search and (t := search_tool()) else [])
    protocol = (ReActProtocol(call_protocol=CALL_PROTOCOL_CN, force_stop=FORCE_STOP_PROMPT_CN)
                if language == "zh" else
                ReActProtocol(call_protocol=CALL_PROTOCOL_EN, force_stop=FORCE_STOP_PROMPT_EN))
    llm = make_llm(server, model=model, api_key=api_key, **llm_kwargs)
    return ReAct(llm=llm, action_executor=ActionExecutor(actions=tools), protocol=protocol,
                 max_turn=max_turn)


def ask_agent(agent, question: str):
    """Run one ReAct episode; a server problem becomes a CourseError."""
    try:
        return agent.chat(question)
    except RuntimeError as exc:
        raise CourseError(f"The agent's model server did not answer ({exc}). Is the server "
                          "running? Check serving.Server.log_tail().") from exc


def execute_action(agent, reply: str):
    """Parse a ReAct-formatted model reply and run its action, exactly as the agent would."""
    thought, action, action_input = agent._protocol.parse(reply, agent._action_executor)
    result = agent._action_executor(action, action_input)
    result.thought = thought
    return result


@dataclass
class TraceStep:
    reply: str  # what the model wrote
    action: str
    action_input: str
    observation: str  # the tool's result or error, or the final answer


def trace_steps(agent_return) -> list[TraceStep]:
    """One step per model turn: the raw reply, the parsed action, and what came back."""
    replies = [m["content"] for m in agent_return.inner_steps if m["role"] == "assistant"]
    steps = []
    for reply, act in zip(replies, agent_return.actions):
        args = act.args or {}
        if isinstance(args, dict):
            args = args.get("command", args.get("inputs", "")) if args else ""
        observation = act.format_result() if act.result else (act.errmsg or "")
        steps.append(TraceStep(reply.strip(), act.type or "", str(args).strip(), observation.strip()))
    return steps


def format_trace(agent_return) -> str:
    """The whole episode as text: each reply, its thought/action/tool result, then the answer."""
    lines = []
    for n, step in enumerate(trace_steps(agent_return), 1):
        lines += [f"--- turn {n}: the model wrote ---", step.reply or "(nothing)",
                  f"--- parsed: action = {step.action}"]
        if step.action_input:
            lines.append(f"    action input = {step.action_input}")
        lines.append(f"--- tool result: {step.observation or '(none)'}")
    lines.append(f"=== final answer: {(agent_return.response or '').strip()}")
    return "\n".join(lines)
