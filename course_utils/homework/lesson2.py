"""Checks of homework/02_chat_and_agents.ipynb: a long story, a hub download, an agent's tool call."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..paths import DATA_DIR
from .framework import Missing, answer_field, task, within

STORY_MIN = 300  # English words, or Chinese characters for a Chinese story
HUB_REPO = "internlm/internlm-20b"  # the bootcamp's homework: InternLM-20B's config.json


def _story_text(answer) -> str:
    """The story from a ``chat.Story``, a string, or a chat session's assistant turns."""
    if isinstance(answer, str):
        return answer
    if isinstance(getattr(answer, "text", None), str):
        return answer.text
    history = getattr(answer, "history", None)
    if isinstance(history, list):
        return "\n\n".join(m["content"] for m in history if m.get("role") == "assistant")
    raise Missing("return the story: a chat.Story (write_story), its text, or the chat session")


@task("L2.story", level="basic", title=f"a {STORY_MIN}-word story from the chat model",
      hint=f"a small model stops after a few sentences: keep the conversation going and ask it to "
           f"continue until the story reaches {STORY_MIN} (lesson 2 §5 shows a chat helper that does "
           "this); write in the model's language, and return the story or the session")
def _check_story(answer) -> str:
    from ..chat import count_words

    text = _story_text(answer)
    zh = count_words(text, "zh") > count_words(text, "en")
    unit, length = ("Chinese characters", count_words(text, "zh")) if zh else \
        ("English words", count_words(text, "en"))
    if length < STORY_MIN:
        raise Missing(f"the story has {length} {unit}; it needs at least {STORY_MIN}")
    sentences = [s.strip() for s in re.split(r"[.!?。！？\n]+", text) if len(s.strip()) > 3]
    distinct = len(set(sentences)) / max(len(sentences), 1)
    if distinct < 0.5:  # padding by repetition is not a story
        raise Missing(f"only {distinct:.0%} of its {len(sentences)} sentences are distinct: "
                      "the length comes from repetition")
    return f"{length} {unit} (≥ {STORY_MIN}), {len(set(sentences))} distinct sentences"


def _json_file(answer, key: str, name: str) -> dict:
    path = Path(answer_field(answer, key, (str, os.PathLike)))
    if path.name != name or not path.is_file():
        raise Missing(f"{key!r} should be the path of the downloaded {name}, got {path.name!r}")
    if DATA_DIR / "hub_mirror" in path.resolve().parents:
        raise Missing(f"{name} is the mirror's own copy: download it through huggingface_hub "
                      "(hub.download(..., endpoint=mirror.endpoint))")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise Missing(f"{name} is not valid JSON ({exc}): download it again") from None


@task("L2.download", level="basic", title="download InternLM-20B's config.json, count its layers and parameters",
      hint=f"start the classroom mirror (hub.serve_mirror) and download config.json of '{HUB_REPO}' "
           "through huggingface_hub with endpoint=mirror.endpoint; the layer count is in the file, and "
           "memory.count_parameters turns the file's shape into a parameter count")
def _check_download(answer) -> str:
    from ..memory import count_parameters

    config = _json_file(answer, "config", "config.json")
    if config.get("model_type") != "internlm" or config.get("hidden_size") != 5120:
        raise Missing(f"this config.json is not InternLM-20B's (model_type internlm, hidden 5120): "
                      f"download it from '{HUB_REPO}'")
    layers, params = answer_field(answer, "layers", int), answer_field(answer, "parameters", (int, float))
    if layers != config["num_hidden_layers"]:
        raise Missing(f"layers={layers}, but config.json says num_hidden_layers="
                      f"{config['num_hidden_layers']}")
    from_config = count_parameters(config)  # recomputed from the downloaded file
    if not within(params, from_config, 0.01):
        raise Missing(f"parameters={params:,.0f}, but the downloaded config gives {from_config:,}")
    return (f"config.json downloaded and parsed: {layers} layers, {params / 1e9:.2f} B parameters "
            f"(from the config: {from_config / 1e9:.3f} B)")


def _python_actions(answer) -> list:
    """The Python-tool actions of a Lagent ``AgentReturn``."""
    from ..agent import TOOL_NAME

    actions = getattr(answer, "actions", None)
    if actions is None:
        raise Missing("return what agent.ask_agent(agent, question) gave back (a Lagent AgentReturn)")
    return [a for a in actions if getattr(a, "type", None) == TOOL_NAME]


@task("L2.agent", level="advanced", title="an agent run that uses the Python tool",
      hint="agent.ask_agent(agent.make_agent(server), question) with a question it must compute; "
           "a small model needs a worked ReAct example before the question (pass a message list) "
           "and repetition_penalty=1.0 so it may copy the format")
def _check_agent(answer) -> str:
    from lagent.actions import FinishAction
    from lagent.schema import ActionStatusCode

    from ..agent import strip_fences  # the tool strips Markdown fences the same way
    from ..sandbox import run_python

    calls = _python_actions(answer)
    if not calls:
        raise Missing("the agent never called the Python tool: ask something it must compute")
    good = [a for a in calls if a.state == ActionStatusCode.SUCCESS and a.result]
    if not good:
        raise Missing(f"the Python tool was called {len(calls)} time(s) but never ran cleanly: "
                      f"{calls[-1].errmsg}")
    action = good[-1]
    command = action.args.get("command", "") if isinstance(action.args, dict) else str(action.args)
    recorded = action.result[0]["content"].strip()
    rerun = run_python(strip_fences(command), timeout=10)
    if not rerun.ok or (rerun.output.strip() or "(no output)") != recorded:
        raise Missing("re-running the tool's code does not give the recorded result")
    if getattr(answer.actions[-1], "type", None) != FinishAction().name:
        raise Missing("the agent stopped without a Final Answer: give it more turns (max_turn)")
    return (f"the Python tool ran {len(good)} time(s); re-running {command.strip()[:40]!r} gives "
            f"{recorded[:40]!r} again; final answer given")
