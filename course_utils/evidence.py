"""A homework answer as data: saved inside the grader's sandbox, rebuilt in the grader's own process.

The grader never trusts what a submission prints or stores: ``homework.check`` (in grading mode)
saves each answer here as JSON plus tensors, and the grader rebuilds objects its checks can use,
loading models, stores and caches itself. Nothing is unpickled; a path is followed only if it
resolves (symlinks included) under a folder the grader allows; a model is loaded only by registry
name or from the course's own model folders, never from a folder the submission made.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import json
import os
from pathlib import Path
from types import SimpleNamespace

from .errors import CourseError

ANSWER_FILE = "answer.json"
MAX_DEPTH = 8
MAX_ANSWER_MB = 20  # the JSON part; tensors go to their own files
_ROOTS: contextvars.ContextVar = contextvars.ContextVar("grader_roots", default=None)


def _model_name(model) -> str:
    return str(getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", ""))


def _cache_kind(cache) -> str:
    """int8/int4 (the course's stores), quanto-int4, or bf16/fp32, as kvcache.make_cache names them."""
    layer = cache.layers[0]
    store = getattr(layer, "store", layer)
    if hasattr(store, "bits"):
        return f"int{store.bits}"
    if "quant" in type(cache).__name__.lower() or hasattr(layer, "_quantized_keys"):
        return "quanto-int4"
    keys = getattr(layer, "keys", None)
    return "bf16" if keys is not None and str(keys.dtype) == "torch.bfloat16" else "fp32"


def _quantized(model) -> list[dict]:
    from .quantize import QuantLinear

    return [{"name": n, "in": m.in_features, "out": m.out_features, "group": m.group_size}
            for n, m in model.named_modules() if isinstance(m, QuantLinear)]


class _Saver:
    def __init__(self, folder: Path):
        self.folder, self.n = folder, 0

    def encode(self, value, depth: int = 0):
        if depth > MAX_DEPTH:
            return None
        if value is None or isinstance(value, (bool, int, float, str)):
            return value.value if isinstance(value, enum.Enum) else value
        if isinstance(value, os.PathLike):
            return {"$": "path", "path": str(Path(value).absolute())}
        if isinstance(value, (list, tuple)):
            return [self.encode(v, depth + 1) for v in value]
        if isinstance(value, dict):
            return {"$": "dict", "items": {str(k): self.encode(v, depth + 1) for k, v in value.items()}}
        kind = type(value).__name__
        if kind in ("NotDone", "Crashed"):
            return {"$": kind, **dataclasses.asdict(value)}
        if kind == "Chroma":
            return {"$": "store", "path": str(Path(value._client.get_settings().persist_directory))}
        if kind == "ChatSession":
            model = getattr(value.backend, "model", None)
            return {"$": "chat", "model": _model_name(model) if hasattr(model, "config") else None,
                    "history": self.encode(value.history, depth + 1)}
        if kind == "Server":  # the process is gone when the grader looks: only where it listened
            return {"$": "object", "fields": {k: self.encode(getattr(value, k), depth + 1)
                                             for k in ("backend", "model", "host", "port")}}
        if kind == "ChatCompletion":
            return {"$": "completion", "data": value.model_dump(mode="json")}
        if hasattr(value, "get_seq_length") and hasattr(value, "layers"):
            return {"$": "kvcache", "kind": _cache_kind(value), "tokens": int(value.get_seq_length())}
        if hasattr(value, "config") and hasattr(value, "named_modules") and not hasattr(value, "disable_adapter"):
            return self._model(value)
        if hasattr(value, "name_or_path") and hasattr(value, "apply_chat_template"):
            return {"$": "tokenizer", "model": str(value.name_or_path)}
        if dataclasses.is_dataclass(value):
            return {"$": "object", "fields": {f.name: self.encode(getattr(value, f.name), depth + 1)
                                             for f in dataclasses.fields(value)}}
        return {"$": "opaque", "type": kind}  # live objects the checks do not need (a PEFT model)

    def _model(self, model) -> dict:
        layers = _quantized(model)
        record = {"$": "model", "model": _model_name(model), "quantized": layers}
        if layers:  # the packed weights are the evidence: keep every tensor as it is
            from safetensors.torch import save_file

            self.n += 1
            name = f"model-{self.n}.safetensors"
            tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            seen, unique = set(), {}
            for key, t in tensors.items():  # tied weights: safetensors refuses shared storage
                ptr = (t.data_ptr(), t.numel())
                unique[key] = t.clone() if ptr in seen else t
                seen.add(ptr)
            save_file(unique, str(self.folder / name))
            record["tensors"] = name
        return record


def save(answer, folder: str | Path) -> None:
    """Write ``answer`` into ``folder`` (answer.json and any tensors)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = _Saver(folder).encode(answer)
    (folder / ANSWER_FILE).write_text(json.dumps(data), encoding="utf-8")


# ---- rebuilding, in the grader -------------------------------------------------------------------

def model_roots() -> list[Path]:
    """Where the grader may load a model from: the course's model cache and installed packages."""
    from .paths import cache_dir
    from .sandbox import python_dirs

    return [cache_dir().resolve(), *map(Path, python_dirs())]


@contextlib.contextmanager
def confined(roots):
    """While checking in the grader: files the checks read must lie under ``roots``."""
    token = _ROOTS.set([Path(r).resolve() for r in roots])
    try:
        yield
    finally:
        _ROOTS.reset(token)


def readable(path: str | Path) -> Path:
    """A path a check found inside an answer's files: confined in the grader, as is elsewhere."""
    roots = _ROOTS.get()
    return inside(path, roots) if roots is not None else Path(path)


def inside(path: str | Path, roots) -> Path:
    """``path`` if it resolves (symlinks followed) under one of ``roots``; else a CourseError.

    The path itself is returned, not its target: a hub download is a symlink into a blob store.
    Nothing can change the link afterwards: the sandbox that made it is gone.
    """
    real = Path(path).resolve()
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise CourseError(f"{Path(path).name!r} lies outside the folders the grader reads")
    return Path(path)


def course_model(name: str) -> str:
    """``name`` if it is a registry name or one of the course's own model folders: never a folder a
    submission made (a config's ``auto_map`` would run its code in the grader)."""
    from .models import spec

    try:
        spec(name)
        return name
    except CourseError:
        return str(inside(name, model_roots()))


class _Loader:
    def __init__(self, folder: Path, roots, classes: dict):
        self.folder, self.roots, self.models = folder, [Path(r).resolve() for r in roots], {}
        self.classes = classes

    def _load_model(self, name: str):
        from .models import load_model

        if name not in self.models:
            self.models[name] = load_model(course_model(name))
        return self.models[name]

    def decode(self, value):
        if isinstance(value, list):
            return [self.decode(v) for v in value]
        if not isinstance(value, dict):
            return value
        kind = value.get("$")
        if kind == "dict":
            return {k: self.decode(v) for k, v in value["items"].items()}
        if kind == "path":
            return inside(value["path"], self.roots)
        if kind in self.classes:  # homework's NotDone / Crashed
            return self.classes[kind](**{k: v for k, v in value.items() if k != "$" and isinstance(v, str)})
        if kind == "store":
            from .knowledge import load_vectorstore

            return load_vectorstore(inside(value["path"], self.roots))
        if kind == "chat":
            from .chat import ChatSession

            if not value["model"]:
                return None
            session = ChatSession.load(self._load_model(value["model"]))
            session.history = [m for m in self.decode(value.get("history") or [])
                               if isinstance(m, dict) and isinstance(m.get("content"), str)]
            return session
        if kind == "completion":
            from openai.types.chat import ChatCompletion

            return ChatCompletion.model_validate(value["data"])
        if kind == "tokenizer":
            return self._load_model(value["model"])[1]
        if kind == "model":
            return self._model(value)
        if kind == "kvcache":
            return value  # rebuilt by the check that knows the model (see rebuild_cache)
        if kind == "object":
            return SimpleNamespace(running=False, **{k: self.decode(v) for k, v in value["fields"].items()})
        return None

    def _model(self, value: dict):
        import copy

        from .quantize import QuantLinear, set_module

        base = copy.deepcopy(self._load_model(value["model"])[0])
        if not value.get("quantized"):
            return base
        from safetensors.torch import load_file

        tensors = load_file(str(inside(self.folder / value["tensors"], [self.folder.resolve()])))
        for layer in value["quantized"]:
            n = layer["name"]
            get = lambda key: tensors.get(f"{n}.{key}")  # noqa: E731
            set_module(base, n, QuantLinear(int(layer["in"]), int(layer["out"]), int(layer["group"]),
                                            get("qweight"), get("scales"), get("zeros"),
                                            get("input_scale"), get("bias")))
        params = dict(base.named_parameters())
        for key, t in tensors.items():  # the rest (norms, embeddings) in the dtype the learner left
            if key in params:
                params[key].data = t
        return base


def rebuild_cache(record: dict, model):
    """A real cache of the saved kind holding the saved number of tokens, made for ``model``."""
    from .kvcache import fill_cache, make_cache

    if not isinstance(record, dict) or record.get("$") != "kvcache":
        return record
    return fill_cache(make_cache(record["kind"], model.config), model.config, int(record["tokens"]))


def load(folder: str | Path, roots, classes=()):
    """The answer saved in ``folder``, rebuilt; paths must resolve under ``roots``.

    ``classes``: the dataclasses saved by name that come back as themselves (homework's NotDone,
    Crashed); passed in so that this module does not import the homework framework that uses it.
    """
    folder = Path(folder)
    answer_file = inside(folder / ANSWER_FILE, [folder.resolve()])  # not a link to a host file
    if answer_file.stat().st_size > MAX_ANSWER_MB * 2**20:
        raise CourseError(f"{ANSWER_FILE} is over {MAX_ANSWER_MB} MB: answers are small records")
    data = json.loads(answer_file.read_text(encoding="utf-8"))
    answer = _Loader(folder, [*roots, folder], {c.__name__: c for c in classes}).decode(data)
    if isinstance(answer, dict) and isinstance(answer.get("cache"), dict):
        answer["cache"] = rebuild_cache(answer["cache"], answer.get("model"))
    return answer
