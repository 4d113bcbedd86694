"""Using LMDeploy on a CUDA GPU: the commands a learner types, engine settings, pipelines, KV-cache plans.

The engine settings are ``quant_policy``, ``cache_max_entry_count`` and ``tp`` of ``pipeline`` and
``lmdeploy chat``; :func:`kv_cache_plan` says what they leave for the KV cache on a GPU slice.

Written for the pinned LMDeploy (0.10.2, requirements/gpu.txt). Every argument is built and
checked by a pure function; the CI simulation stage parses each command line with LMDeploy's own
parser. LMDeploy's engines, TurboMind and the PyTorch backend, need a CUDA GPU and raise
:class:`CourseError` here. Quantizing weights with ``lmdeploy lite auto_awq`` is
:mod:`course_utils.lmdeploy_awq`.
"""

from __future__ import annotations

from .errors import CourseError

QUANT_POLICIES = {0: "fp16/bf16 KV cache", 8: "int8 KV cache", 4: "int4 KV cache"}
MODEL_FORMATS = (None, "hf", "awq", "gptq")
BACKENDS = ("turbomind", "pytorch")
# What `lmdeploy chat` prints when it waits for input (lmdeploy/cli/chat.py, 0.10.2); `exit` quits.
CHAT_PROMPT = "double enter to end input >>> "
# Commands of the bootcamp's LMDeploy (0.2 to 0.6) that the pinned 0.10.2 no longer has, and why.
REMOVED_COMMANDS = {
    "lmdeploy convert": "TurboMind converts a Hugging Face folder (fp16 or AWQ) to its own layout in "
                        "memory at every start (turbomind.deploy.converter.get_tm_model): pass the "
                        "HF folder itself to chat / pipeline / api_server.",
    "lmdeploy serve gradio": "the Gradio web UI was dropped: start `lmdeploy serve api_server` and chat "
                             "with it from any OpenAI-compatible client (the course's ChatWidget).",
}


def require_lmdeploy(what: str = "LMDeploy", device: str = "cuda") -> None:
    """Raise a :class:`CourseError` unless the ``lmdeploy`` package (and, for cuda, a GPU) is present."""
    import importlib.util

    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise CourseError(f"{what} needs a CUDA GPU (LMDeploy's engines have no CPU backend) and this "
                          "machine has none. On the CPU use course_utils.quantize (W4A16 RTN/AWQ) and "
                          "course_utils.kvcache instead (or lmdeploy_awq.AwqJob(device='cpu') for auto_awq "
                          "in the InternStudio env), or run this on InternStudio.")
    if importlib.util.find_spec("lmdeploy") is None:
        raise CourseError(f"{what} needs LMDeploy: pip install -r requirements/gpu.txt")


def engine_config(*, quant_policy: int = 0, cache_max_entry_count: float = 0.8,
                  model_format: str | None = None, tp: int = 1, session_len: int | None = None,
                  max_batch_size: int | None = None) -> dict:
    """Checked keyword arguments for ``lmdeploy.TurbomindEngineConfig`` (None values left out)."""
    if quant_policy not in QUANT_POLICIES:
        raise CourseError(f"quant_policy={quant_policy}: use 0 (off), 8 (int8 KV) or 4 (int4 KV).")
    if not 0 < cache_max_entry_count <= 1:
        raise CourseError("cache_max_entry_count is the share of the GPU memory left after the "
                          f"weights that the KV cache takes: use (0, 1], not {cache_max_entry_count}.")
    if model_format not in MODEL_FORMATS:
        raise CourseError(f"model_format={model_format!r}: use None, 'hf', 'awq' or 'gptq'.")
    if tp < 1 or tp & (tp - 1):
        raise CourseError(f"tp={tp}: tensor parallelism takes a power of two GPUs (1, 2, 4, 8).")
    cfg = dict(quant_policy=quant_policy, cache_max_entry_count=cache_max_entry_count,
               model_format=model_format, tp=tp, session_len=session_len, max_batch_size=max_batch_size)
    return {k: v for k, v in cfg.items() if v is not None}


def chat_cli(model: str, *, backend: str = "turbomind", cache_max_entry_count: float = 0.8,
             quant_policy: int = 0, model_format: str | None = None, tp: int = 1,
             session_len: int | None = None) -> list[str]:
    """The ``lmdeploy chat`` command line (an interactive terminal chat; CUDA only)."""
    if backend not in BACKENDS:
        raise CourseError(f"backend={backend!r}: LMDeploy's engines are 'turbomind' or 'pytorch'.")
    cfg = engine_config(quant_policy=quant_policy, cache_max_entry_count=cache_max_entry_count,
                        model_format=model_format, tp=tp, session_len=session_len)
    cmd = ["lmdeploy", "chat", model, "--backend", backend]
    for key, value in cfg.items():
        if backend == "pytorch" and key == "model_format":
            raise CourseError("model_format is a TurboMind option: use backend='turbomind' for AWQ weights.")
        if key != "tp" or value != 1:  # tp=1 is the default: keep the command short
            cmd += ["--" + key.replace("_", "-"), str(value)]
    return cmd


def quant_policy_table(shape, gpu_gb: float = 8, *, cache_max_entry_count: float = 0.4):
    """``quant_policy`` 0 / 8 / 4 on a GPU: what each stores, bytes per value, and the tokens it holds."""
    import pandas as pd

    what = {0: "K/V kept in fp16/bf16 as computed",
            8: "K/V per head and token to int8, with an fp16 scale and zero (near lossless)",
            4: "K/V per head and token to int4, with an fp16 scale and zero (cheaper, loses some accuracy)"}
    rows = []
    for policy in (0, 8, 4):
        plan = kv_cache_plan(shape, gpu_gb, cache_max_entry_count=cache_max_entry_count,
                             quant_policy=policy)
        rows.append({"quant_policy": policy, "KV cache": QUANT_POLICIES[policy], "what it does": what[policy],
                     "bytes per K/V value": {0: 2, 8: 1, 4: 0.5}[policy], "KV tokens": plan["KV tokens"]})
    return pd.DataFrame(rows).set_index("quant_policy")


def make_pipeline(model: str, **engine):
    """An LMDeploy ``pipeline`` (TurboMind) for ``model`` with :func:`engine_config` settings."""
    cfg = engine_config(**engine)
    require_lmdeploy("lmdeploy.pipeline")
    from lmdeploy import TurbomindEngineConfig, pipeline

    return pipeline(model, backend_config=TurbomindEngineConfig(**cfg))


def gpu_memory_used_mib() -> int:
    """GPU memory in use on device 0 as ``nvidia-smi`` reports it (LMDeploy allocates outside torch)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise CourseError("nvidia-smi is not available: GPU memory can only be read on a CUDA "
                          "machine.") from exc
    return int(out.split()[0])


def pipeline_benchmark(pipe, prompts: list[str], *, max_new_tokens: int = 256) -> dict:
    """Run ``prompts`` as one batch through an LMDeploy pipeline: tokens/s and GPU memory in use."""
    import time

    from lmdeploy import GenerationConfig

    start = time.perf_counter()
    responses = pipe(prompts, gen_config=GenerationConfig(max_new_tokens=max_new_tokens, top_k=1))
    seconds = time.perf_counter() - start
    tokens = sum(r.generate_token_len for r in responses)
    return {"tokens": tokens, "seconds": seconds, "tokens/s": tokens / seconds,
            "GPU memory (MiB)": gpu_memory_used_mib(), "first reply": responses[0].text}


def gpu_variants_table(model: str, awq_dir: str | None, prompts: list[str], *,
                       cache_max_entry_count: float = 0.4, max_new_tokens: int = 256):
    """The bootcamp's table on a GPU: fp16, W4A16, KV int8 and both, each in a fresh pipeline."""
    import gc

    import pandas as pd

    variants = [("fp16", model, None, 0), ("KV int8", model, None, 8)]
    if awq_dir:
        variants += [("W4A16", awq_dir, "awq", 0), ("W4A16 + KV int8", awq_dir, "awq", 8)]
    rows = []
    for name, path, fmt, policy in variants:
        pipe = make_pipeline(path, model_format=fmt, quant_policy=policy,
                             cache_max_entry_count=cache_max_entry_count)
        rows.append({"variant": name, **pipeline_benchmark(pipe, prompts, max_new_tokens=max_new_tokens)})
        if hasattr(pipe, "close"):  # free the engine's GPU memory before the next variant
            pipe.close()
        del pipe
        gc.collect()
    return pd.DataFrame(rows).set_index("variant")


def kv_cache_plan(shape, gpu_gb: float, *, weight_precision: str = "fp16",
                  cache_max_entry_count: float = 0.8, quant_policy: int = 0,
                  runtime_gb: float = 1.0) -> dict:
    """What ``cache_max_entry_count`` means on a GPU of ``gpu_gb`` GiB: KV budget and tokens it holds.

    LMDeploy (>= 0.2.1) gives the KV cache ``cache_max_entry_count`` x the memory still free after
    the weights (and runtime buffers, ``runtime_gb``) are loaded. ``shape`` is a
    :class:`course_utils.memory.ModelShape`.
    """
    from .memory import GIB, kv_bytes_per_token, weight_memory

    engine_config(quant_policy=quant_policy, cache_max_entry_count=cache_max_entry_count)
    weights = weight_memory(shape, weight_precision) / GIB
    free = gpu_gb - weights - runtime_gb
    if free <= 0:
        raise CourseError(f"{shape.name} in {weight_precision} ({weights:.1f} GiB) does not fit in "
                          f"{gpu_gb} GiB: use W4A16 (model_format='awq') or a bigger GPU slice.")
    kv_precision = {0: "fp16", 8: "int8", 4: "int4"}[quant_policy]
    kv_gb = free * cache_max_entry_count
    tokens = int(kv_gb * GIB / kv_bytes_per_token(shape, kv_precision))
    return {"model": shape.name, "weights": weight_precision, "quant_policy": quant_policy,
            "cache_max_entry_count": cache_max_entry_count, "weights (GiB)": round(weights, 2),
            "KV cache (GiB)": round(kv_gb, 2), "KV tokens": tokens,
            "total (GiB)": round(weights + runtime_gb + kv_gb, 2)}
