"""Reference solutions for homework/03_rag_knowledge_base.ipynb.

Each ``# %% task:<id>`` section replaces the notebook cell tagged ``task:<id>`` (tests/test_homework.py).
"""

# %% task:L3.kb
from course_utils import rag
from course_utils.chat import ChatSession
from course_utils.paths import DATA_DIR, outputs_dir

KB_DIR = DATA_DIR / "knowledge_base"
STORE_DIR = outputs_dir() / "homework" / "kb_store"


def rag_beats_bare() -> dict:
    """A knowledge base over KB_DIR and a question the bare model gets wrong but RAG gets right."""
    store, report = rag.build_vectorstore(KB_DIR, STORE_DIR, progress=False)
    print(report)
    chat = ChatSession.load(max_new_tokens=64)
    question, fact = "What is the default port of the LMDeploy api_server?", "23333"
    print("bare:", chat.complete([{"role": "user", "content": question}]))
    print("RAG: ", rag.make_rag_chain(chat, store, k=4).invoke(question)["answer"])
    return {"store": store, "chat": chat, "question": question, "fact": fact}


kb = homework.attempt(rag_beats_bare)

# %% task:L3.hit3
def better_retrieval() -> dict:
    """A store over the whole knowledge base whose hit@3 on the eval set beats the lesson's default."""
    config = rag.SplitConfig(chunk_size=300, chunk_overlap=100)
    store, _ = rag.build_vectorstore(KB_DIR, outputs_dir() / "homework" / "kb_store_300", config=config,
                                     progress=False)
    print(rag.evaluate_retrieval(store, rag.load_eval_set(), k=3))
    return {"store": store, "mmr": False}


retrieval = homework.attempt(better_retrieval)
