"""Reference solutions for homework/02_chat_and_agents.ipynb.

Each ``# %% task:<id>`` section replaces the notebook cell tagged ``task:<id>`` (tests/test_homework.py).
"""

# %% task:L2.story
from course_utils.chat import ChatSession, write_story
from course_utils.env import profile


def my_story():
    """A story of at least 300 English words (or 300 Chinese characters) from the chat model."""
    session = ChatSession.load()
    topic = "a robot who learns to paint" if profile() == "tiny" else "一个学画画的机器人"
    return write_story(session, topic, min_words=300)


story = homework.attempt(my_story)
print(story.length, "words or characters in", story.rounds, "rounds")

# %% task:L2.download
import json

from course_utils import hub, memory
from course_utils.paths import outputs_dir

REPO = "internlm/internlm-20b"


def download_and_count() -> dict:
    """Download REPO's config.json; return its path, the layer count and the parameter count."""
    mirror = hub.serve_mirror() if profile() == "tiny" else None  # the classroom mirror, offline
    endpoint = mirror.endpoint if mirror else None
    try:
        config_path = hub.download(REPO, "config.json", endpoint=endpoint,
                                   cache_dir=outputs_dir() / "homework" / "hub")
    finally:
        if mirror:
            mirror.stop()
    config = json.loads(config_path.read_text())
    return {"config": config_path, "layers": config["num_hidden_layers"],
            "parameters": memory.count_parameters(config)}


downloaded = homework.attempt(download_and_count)

# %% task:L2.agent
from course_utils import agent, serving

# One worked example in the ReAct format before the question: a 135M model copies the pattern
# (with repetition_penalty=1.0, so repeating "Action: PythonInterpreter" is not penalised).
EXAMPLE = [
    {"role": "user", "content": "What is 17 * 23? Use Python."},
    {"role": "assistant", "content": "Thought: I will compute it with Python.\n"
                                     "Action: PythonInterpreter\nAction Input: print(17 * 23)"},
    {"role": "system", "content": "Response:391\n"},
    {"role": "assistant", "content": "Thought: The tool printed the result.\nFinal Answer: 17 * 23 = 391"},
]


def run_agent():
    """One ReAct episode in which the model calls the Python tool; returns the AgentReturn."""
    tiny = profile() == "tiny"
    question = "What is 12345 * 6789? Use Python." if tiny else "生成一个一元二次方程，并用 Python 求解。"
    with serving.serve(port=serving.free_port()) as server:
        bot = agent.make_agent(server, search=False, repetition_penalty=1.0, max_new_tokens=96)
        run = agent.ask_agent(bot, (EXAMPLE if tiny else []) + [{"role": "user", "content": question}])
    print(agent.format_trace(run))
    return run


agent_run = homework.attempt(run_agent)
