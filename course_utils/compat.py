"""Everything that differs between the two transformers majors the course runs on, in one place.

The CPU lock (``requirements/cpu.txt``) has transformers 5.x. The InternStudio lock
(``requirements/gpu.txt``) has 4.48.0: InternLM2.5's own model code breaks from 4.49 on and
XTuner 0.2.0 pins it (docs/architecture.md, "One env for the InternLM toolchain"). Other modules
ask here instead of checking versions themselves; ``tests/test_compat.py`` runs in both envs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from pathlib import Path

from .errors import CourseError

# InternLM2 / InternLM2.5 ship their model as remote code written for transformers 4.41-4.48.
REMOTE_CODE_LAST_GOOD = (4, 48)


@functools.cache
def transformers_version() -> tuple[int, int]:
    """(major, minor) of the installed transformers, without importing it."""
    from importlib.metadata import version

    major, minor = version("transformers").split(".")[:2]
    return int(major), int(minor)


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` from 4.56 on, ``torch_dtype`` before.

    4.48 takes an unknown ``dtype=`` without complaint and loads fp32, so the name matters.
    """
    return {"dtype": dtype} if transformers_version() >= (4, 56) else {"torch_dtype": dtype}


def warmup_kwargs(ratio: float) -> dict:
    """TrainingArguments' warm-up share: 5.x takes a float ``warmup_steps``, 4.x ``warmup_ratio``."""
    return {"warmup_steps": ratio} if transformers_version() >= (5, 0) else {"warmup_ratio": ratio}


def bnb_4bit_on_cpu() -> bool:
    """Whether bitsandbytes runs 4-bit layers on a CPU: from 0.46 (the CPU env), not 0.45 (XTuner's pin)."""
    from importlib.metadata import version

    return tuple(int(x) for x in version("bitsandbytes").split(".")[:2]) >= (0, 46)


def has_serve_cli() -> bool:
    """Whether ``transformers serve`` (the OpenAI-compatible CPU server) exists: 5.x only."""
    return transformers_version() >= (5, 0)


def use_remote_code(config: dict) -> bool:
    """Whether to run a folder's own model code: InternLM2 always; InternLM3 only before 5.x made it native."""
    if "auto_map" not in config:
        return False
    return config.get("model_type") == "internlm2" or (
        config.get("model_type") == "internlm3" and transformers_version() < (5, 0))


def check_remote_code(folder: Path, config: dict) -> None:
    """Refuse, before the slow load, a remote-code InternLM2 model on a transformers it breaks on."""
    remote = "auto_map" in config and config.get("model_type") == "internlm2"
    if remote and transformers_version() > REMOTE_CODE_LAST_GOOD:
        have = ".".join(map(str, transformers_version()))
        raise CourseError(
            f"{Path(folder).name} runs InternLM2's own model code, which breaks on transformers "
            f"{have} (cached generation and save fail; InternLM/InternLM#832). Use the InternStudio "
            "env, which pins transformers 4.48.0: `conda env create -f environment.yml` "
            "(README, InternStudio), or `make sim` on a CPU.")


def _rewrite_json(path: Path, change) -> bool:
    data = json.loads(path.read_text(encoding="utf-8"))
    before = json.dumps(data, sort_keys=True)
    change(data)
    if json.dumps(data, sort_keys=True) == before:
        return False
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)  # readers never see half a file
    return True


def make_portable(folder: str | Path) -> bool:
    """Let transformers 4.x read a folder that 5.x wrote as the same model and tokenizer.

    5.x names its generic tokenizer ``TokenizersBackend``, keeps the chat template in
    ``chat_template.jinja`` and RoPE's base in ``rope_parameters``; 4.48 knows none of these and
    would fail, or worse, silently use RoPE base 10000. Both majors read the result. Returns
    whether anything changed.
    """
    folder = Path(folder)
    template = folder / "chat_template.jinja"

    def tokenizer(cfg: dict) -> None:
        if cfg.get("tokenizer_class") == "TokenizersBackend":
            cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        if cfg.get("tokenizer_class") == "PreTrainedTokenizerFast":
            # 4.x's generic class would also return token_type_ids, which generate() rejects.
            cfg.setdefault("model_input_names", ["input_ids", "attention_mask"])
        if "chat_template" not in cfg and template.is_file():
            cfg["chat_template"] = template.read_text(encoding="utf-8")

    def model(cfg: dict) -> None:
        rope = cfg.get("rope_parameters") or {}
        if "rope_theta" in rope:
            cfg.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            cfg.setdefault("rope_scaling", rope)
        if "dtype" in cfg:
            cfg.setdefault("torch_dtype", cfg["dtype"])

    changed = False
    for name, change in (("tokenizer_config.json", tokenizer), ("config.json", model)):
        if (folder / name).is_file():
            changed |= _rewrite_json(folder / name, change)
    return changed


# ---- KV caches: 5.x builds a cache from per-layer objects, 4.x keeps per-layer lists ----------
def dynamic_cache(config):
    """An empty plain (full-precision) KV cache for a model with ``config``."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(config=config) if transformers_version() >= (5, 0) else DynamicCache()


def quanto_cache(config, nbits: int = 4):
    """transformers' own quantized KV cache (optimum-quanto backend)."""
    if transformers_version() >= (5, 0):
        from transformers.cache_utils import QuantizedCache

        return QuantizedCache(backend="quanto", config=config, nbits=nbits)
    from transformers.cache_utils import QuantizedCacheConfig, QuantoQuantizedCache

    return QuantoQuantizedCache(cache_config=QuantizedCacheConfig(backend="quanto", nbits=nbits))


@functools.cache
def _store_cache_class():
    """A cache whose layers are ``stores``: objects with update(k, v) -> (K, V) and get_seq_length()."""
    from transformers.cache_utils import DynamicCache

    if transformers_version() >= (5, 0):
        from transformers.cache_utils import Cache, DynamicLayer

        class StoreLayer(DynamicLayer):
            def __init__(self, store):
                super().__init__()
                self.store = store

            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized:
                    self.lazy_initialization(key_states, value_states)
                return self.store.update(key_states, value_states)

            def get_seq_length(self, *args) -> int:
                return self.store.get_seq_length()

            def reset(self) -> None:
                super().reset()
                self.store.reset()

            def tensors(self) -> list:
                return self.store.tensors()

        class StoreCache(Cache):
            def __init__(self, stores):
                super().__init__(layers=[StoreLayer(s) for s in stores])

        return StoreCache

    class StoreCache(DynamicCache):  # 4.x: the model calls update(k, v, layer_idx) on the cache
        def __init__(self, stores):
            super().__init__()
            self.layers = list(stores)

        def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
            if layer_idx == 0:
                self._seen_tokens += key_states.shape[-2]
            return self.layers[layer_idx].update(key_states, value_states)

        def get_seq_length(self, layer_idx: int | None = 0) -> int:
            return self.layers[layer_idx or 0].get_seq_length()

        def __len__(self) -> int:
            return len(self.layers)

    return StoreCache


def store_cache(stores):
    """A transformers cache that keeps each layer's K/V in one of ``stores`` (see kvcache)."""
    return _store_cache_class()(stores)


def cache_layer_tensors(cache) -> list[list]:
    """Every tensor a cache holds, per layer (None where a layer has nothing yet)."""
    if hasattr(cache, "layers"):  # 5.x caches, and store_cache on 4.x
        names = ("keys", "values", "_quantized_keys", "_quantized_values")
        return [(layer.tensors() if hasattr(layer, "tensors") else [])
                + [getattr(layer, n, None) for n in names] for layer in cache.layers]
    names = ("key_cache", "value_cache", "_quantized_key_cache", "_quantized_value_cache")
    lists = [getattr(cache, n, []) for n in names]
    return [[per_layer[i] if i < len(per_layer) else None for per_layer in lists]
            for i in range(max(len(x) for x in lists))]


def quiet_libraries() -> None:
    """Silence library chatter that is not about the learner's run (kept out of stored outputs)."""
    # bitsandbytes warns on import that an optional faster CPU kernel package is missing.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft 0.21 reads a transformers property that 5.x deprecates; nothing for the learner to do.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
