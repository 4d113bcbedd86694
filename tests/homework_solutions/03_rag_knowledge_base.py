"""Reference solutions for homework/03_rag_knowledge_base.ipynb.

Each ``# %% task:<id>`` section replaces the notebook cell tagged ``task:<id>`` (tests/test_homework.py).
"""

# %% task:L3.kb
from course_utils import rag
from course_utils.chat import ChatSession
from course_utils.paths import DATA_DIR, outputs_dir

KB_DIR = DATA_DIR / "knowledge_base"
STORE_DIR = outputs_dir() / "homework" / "kb_store"


# Questions whose answer is one exact string in the knowledge base; a 135M model's greedy replies
# shift with the CPU's floating-point kernels, so try them in turn as a student would.
CANDIDATES = [("What is the vocabulary size of InternLM2?", "92,544"),
              ("What is the default port of the LMDeploy api_server?", "23333"),
              ("How many tokens was InternLM3-8B-Instruct trained on?", "4 trillion")]


def rag_beats_bare() -> dict:
    """A knowledge base over KB_DIR and a question the bare model gets wrong but RAG gets right."""
    store, report = rag.build_vectorstore(KB_DIR, STORE_DIR, progress=False)
    print(report)
    chat = ChatSession.load(max_new_tokens=64, temperature=0.0)
    k = 3  # small models read three chunks better than four
    for question, fact in CANDIDATES:
        bare = chat.complete([{"role": "user", "content": question}])
        answer = rag.make_rag_chain(chat, store, k=k).invoke(question)["answer"]
        print(f"{question}\n  bare: {bare}\n  RAG:  {answer}")
        if fact.lower() not in bare.lower() and fact.lower() in answer.lower():
            return {"store": store, "chat": chat, "question": question, "fact": fact, "k": k}
    raise RuntimeError("no candidate question where RAG beats the bare model")


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

# %% task:L3.own
from course_utils import rag
from course_utils.paths import DATA_DIR, outputs_dir

OWN_DIR = DATA_DIR / "rag_own_example" / "notes"  # a small folder written for this solution
OWN_STORE = outputs_dir() / "homework" / "own_store"


def own_knowledge_base() -> dict:
    """A store over OWN_DIR, twelve labelled questions, and its hit@3 and MRR."""
    qa = rag.load_eval_set(DATA_DIR / "rag_own_example" / "questions.jsonl")
    config = rag.SplitConfig(chunk_size=300, chunk_overlap=50)  # short pages: smaller chunks
    store, _ = rag.build_vectorstore(OWN_DIR, OWN_STORE, config=config, progress=False)
    report = rag.evaluate_retrieval(store, qa, k=3)
    print(report)
    return {"folder": OWN_DIR, "questions": qa, "k": 3, "config": config,
            "hit@k": round(report.hit_rate, 3), "mrr": round(report.mrr, 3)}


own = homework.attempt(own_knowledge_base)
