"""OpenCompass-style evaluation: two inferencers (ppl, gen), evaluators, a summary table, an outputs folder.

``evaluate(model, dataset, mode="ppl"|"gen")`` scores a local transformers model or any
OpenAI-compatible endpoint on a multiple-choice set from ``course_utils.eval_data`` and writes
``outputs/eval/<timestamp>/{predictions,results,summary}`` the way OpenCompass lays out its
``work_dir``; ``reuse=True`` re-scores stored predictions (and finishes an interrupted run).
``export_opencompass_config`` writes the real OpenCompass config for the same evaluation, from
``data/eval/opencompass_config.py.tmpl``. The data half, ``course_utils.eval_data``, is re-exported here.
"""

from __future__ import annotations

import json
import numbers
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from string import Template

from .errors import CourseError
from .eval_data import *  # noqa: F403  re-exported: a notebook needs one import per lesson
from .eval_data import (OPTIONS, EvalDataset, answer_text, build_messages, check_shots, extract_choice,
                        list_datasets, load_dataset, locate_dataset, parse_range, prompt_version, read_predictions,
                        render_plain)  # the names this module itself uses, spelled out for the reader
from .paths import DATA_DIR, REPO_ROOT, outputs_dir

MODES = ("ppl", "gen")
ROW_KEYS = ("id", "category", "prediction", "gold", "correct", "version")  # what _record_row writes


def runs_dir() -> Path:
    """Where evaluation runs go: ``outputs/eval/`` (one timestamped folder per run)."""
    return outputs_dir() / "eval"


# ---- models ------------------------------------------------------------------------------------
class LocalLM:
    """A transformers model and its tokenizer: option log-likelihoods (ppl) and greedy replies (gen)."""

    def __init__(self, model, tokenizer, *, abbr: str | None = None, batch_size: int = 16,
                 padding_side: str = "left"):
        if padding_side not in ("left", "right"):
            raise CourseError(f"padding_side={padding_side!r}: use 'left' or 'right'.")
        self.model, self.tokenizer = model, tokenizer
        self.abbr = abbr or Path(str(getattr(model, "name_or_path", "") or "model")).name
        self.batch_size, self.padding_side = batch_size, padding_side
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._keep_ok = True  # whether forward() takes logits_to_keep (older remote-code models do not)

    def fingerprint(self) -> str:
        """A short hash of the weights as they are now (quantizing or an adapter changes it)."""
        return weights_fingerprint(self.model)

    def render(self, messages: list[dict], style: str, language: str) -> str:
        """The prompt text: the model's chat template, or a plain completion prompt."""
        if style == "chat":
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return render_plain(messages, language)

    def encode(self, text: str, style: str) -> list[int]:
        # A chat template already spells out BOS and turn markers; a plain prompt gets the tokenizer's.
        return self.tokenizer(text, add_special_tokens=style == "plain")["input_ids"]

    def encode_pair(self, context: str, continuation: str, style: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), split where the context's own tokens end."""
        ctx, whole = self.encode(context, style), self.encode(context + continuation, style)
        if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
            return ctx, whole[len(ctx):]
        # The tokenizer merged across the boundary: score the continuation's own tokens instead.
        return ctx, self.tokenizer(continuation, add_special_tokens=False)["input_ids"]

    def loglikelihood(self, pairs: list[tuple[str, str]], style: str = "plain") -> list[tuple[float, int]]:
        """(log P(continuation | context) summed over its tokens, token count) for each pair."""
        encoded = [self.encode_pair(c, x, style) for c, x in pairs]
        return list(zip(self.loglikelihood_ids(encoded), (len(cont) for _, cont in encoded)))

    def loglikelihood_ids(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """Summed log-likelihoods of continuation ids after context ids, batched.

        Left padding (default) runs each distinct context once and feeds its continuations after
        the cached context: four options after one prompt cost one prompt pass plus four short
        ones. Right padding runs every full sequence (simpler, ~3x the work for text answers).
        """
        if any(not ctx or not cont for ctx, cont in pairs):
            raise CourseError("Each scored pair needs a non-empty prompt and answer.")
        if self.padding_side == "left":
            return self._prefix_scores(pairs)
        return self._full_scores(pairs)

    def _pad(self, seqs: list[list[int]], side: str):
        import torch

        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
            ids[row, cols], mask[row, cols] = torch.tensor(seq), 1
        return ids.to(self.model.device), mask.to(self.model.device)

    def _prefix_scores(self, pairs) -> list[float]:
        import torch

        groups: dict[tuple, list] = {}  # context ids -> [(request index, continuation ids)]
        for i, (ctx, cont) in enumerate(pairs):
            groups.setdefault(tuple(ctx), []).append((i, cont))
        contexts, scores = sorted(groups, key=len, reverse=True), [0.0] * len(pairs)
        for start in range(0, len(contexts), self.batch_size):
            batch = contexts[start:start + self.batch_size]
            ids, mask = self._pad([list(c) for c in batch], "left")
            # Left padding ends every row in the last column; positions must count from each
            # row's first real token (models with absolute positions, e.g. GPT-2, need this).
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                out = self._forward(ids, mask, positions, keep=1, use_cache=True)
            first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, vocab): each answer's 1st token
            rows = [(b, i, cont) for b, ctx in enumerate(batch) for i, cont in groups[ctx]]
            for b, i, cont in rows:
                scores[i] = first[b, cont[0]].item()
            longer = [row for row in rows if len(row[2]) > 1]
            cache = getattr(out, "past_key_values", None)
            if longer and hasattr(cache, "batch_select_indices"):
                for (b, i, cont), rest in zip(longer, self._continue(cache, mask, longer)):
                    scores[i] += rest
            elif longer:  # a model without a reusable cache: score the whole sequences instead
                full = self._full_scores([(list(batch[b]), cont) for b, _, cont in longer])
                for (b, i, cont), total in zip(longer, full):
                    scores[i] = total
        return scores

    def _continue(self, cache, ctx_mask, rows) -> list[float]:
        """Feed each continuation but its last token after its cached context; score tokens 2..n."""
        import torch

        index = torch.tensor([b for b, _, _ in rows], device=ctx_mask.device)
        cache.batch_select_indices(index)  # one cache row per continuation
        ids, x_mask = self._pad([cont[:-1] for _, _, cont in rows], "right")  # (R, Lx)
        mask = torch.cat([ctx_mask[index], x_mask], dim=1)
        positions = ctx_mask[index].sum(-1, keepdim=True) + torch.arange(ids.shape[1], device=ids.device)
        with torch.inference_mode():
            logits = self._forward(ids, mask, positions, keep=0, past_key_values=cache).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (R, Lx, vocab)
        return [logprobs[r, :len(cont) - 1].gather(-1, torch.tensor(cont[1:])[:, None]).sum().item()
                for r, (_, _, cont) in enumerate(rows)]

    def _full_scores(self, pairs) -> list[float]:
        import torch

        groups: dict[tuple, list] = {}  # model input (context + continuation minus its last token)
        for i, (ctx, cont) in enumerate(pairs):
            groups.setdefault(tuple(ctx + cont[:-1]), []).append((i, cont))
        inputs, scores = sorted(groups, key=len, reverse=True), [0.0] * len(pairs)
        for start in range(0, len(inputs), self.batch_size):
            batch = inputs[start:start + self.batch_size]
            keep = max(len(cont) for seq in batch for _, cont in groups[seq])
            ids, mask = self._pad([list(s) for s in batch], "right")
            with torch.inference_mode():
                # Right padding keeps positions 0..n-1 by itself, but rows end in different columns.
                logits = self._forward(ids, mask, None, keep=0).logits
            ends = mask.sum(-1, keepdim=True)  # (B, 1)
            cols = (ends - keep + torch.arange(keep, device=ends.device)).clamp(min=0)
            logits = logits.gather(1, cols[..., None].expand(-1, -1, logits.shape[-1]))
            logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()  # (B, keep, vocab)
            for row, seq in enumerate(batch):
                for i, cont in groups[seq]:
                    tail = logprobs[row, keep - len(cont):]  # the positions that predict cont's tokens
                    scores[i] = tail.gather(-1, torch.tensor(cont)[:, None]).sum().item()
        return scores

    def _forward(self, ids, mask, positions, *, keep: int, **kwargs):
        kwargs.update(input_ids=ids, attention_mask=mask)
        if positions is not None:
            kwargs["position_ids"] = positions
        if keep and self._keep_ok:
            try:  # the vocabulary projection for the scored positions only (saves ~15% here)
                return self.model(**kwargs, logits_to_keep=keep)
            except TypeError:
                self._keep_ok = False  # older remote-code models do not take logits_to_keep
        return self.model(**kwargs)

    def generate(self, prompts: list[str], *, style: str, max_new_tokens: int = 32) -> list[str]:
        """Greedy replies to a batch of prompt texts (left-padded, so every row continues at the end)."""
        import torch
        from transformers import GenerationConfig

        ids, mask = self._pad([self.encode(p, style) for p in prompts], "left")
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=self.pad_id,
                                  eos_token_id=self.model.generation_config.eos_token_id)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        return [self.tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


class EndpointLM:
    """An OpenAI-compatible server (LMDeploy, ``transformers serve``, vLLM), like OpenCompass's API models."""

    def __init__(self, base_url: str, *, model: str | None = None, api_key: str | None = None,
                 abbr: str | None = None, batch_size: int = 4, timeout: float = 120):
        import openai

        base_url = base_url.rstrip("/")
        self.base_url = base_url if base_url.endswith("/v1") else base_url + "/v1"
        self.client = openai.OpenAI(base_url=self.base_url, api_key=api_key or "EMPTY",
                                    timeout=timeout, max_retries=1)
        self.model = model or self._first_model()
        self.abbr, self.batch_size = abbr or f"api-{Path(self.model).name}", batch_size

    def fingerprint(self) -> str:
        """The served model's name: a server does not expose its weights, so this is the best it can say."""
        return f"api:{self.model}"

    def _first_model(self) -> str:
        import openai

        try:
            models = self.client.models.list().data
        except openai.APIConnectionError:
            raise CourseError(f"No server answers at {self.base_url}. Start one (course_utils.serving."
                              "serve(...) or `lmdeploy serve api_server ...`) and pass its URL.") from None
        if not models:
            raise CourseError(f"{self.base_url} lists no models; pass model='<served name>'.")
        return models[0].id

    def render(self, messages: list[dict], style: str, language: str):
        """Chat style sends the messages (the server applies its template); plain sends one text."""
        return messages if style == "chat" else render_plain(messages, language)

    def _map(self, fn, items: list) -> list:
        with ThreadPoolExecutor(max_workers=self.batch_size) as pool:  # requests in flight at once
            return list(pool.map(fn, items))

    def generate(self, prompts: list, *, style: str, max_new_tokens: int = 32) -> list[str]:
        """Greedy (temperature 0) replies from the server."""
        def one(prompt):
            if style == "chat":
                reply = self.client.chat.completions.create(
                    model=self.model, messages=prompt, max_tokens=max_new_tokens, temperature=0)
                return reply.choices[0].message.content or ""
            reply = self.client.completions.create(model=self.model, prompt=prompt, temperature=0,
                                                   max_tokens=max_new_tokens)
            return reply.choices[0].text
        return self._map(one, prompts)

    def loglikelihood(self, pairs: list[tuple[str, str]], style: str = "plain") -> list[tuple[float, int]]:
        """(summed log-likelihood, token count) of each continuation, from the prompt logprobs (``echo=True, logprobs``) of /v1/completions."""
        if style != "plain":
            raise CourseError("ppl on an endpoint scores a completion prompt (the server cannot apply "
                              "its chat template to /v1/completions): pass style='plain'.")
        return self._map(lambda pair: self._score(*pair), pairs)

    def _score(self, context: str, continuation: str) -> tuple[float, int]:
        import openai

        try:
            reply = self.client.completions.create(model=self.model, prompt=context + continuation,
                                                   max_tokens=1, temperature=0, echo=True, logprobs=1)
        except openai.BadRequestError as exc:
            raise CourseError(self._no_logprobs(f"it refused echo/logprobs ({exc.message})")) from None
        lp = reply.choices[0].logprobs
        if lp is None or not lp.token_logprobs or not lp.text_offset:
            raise CourseError(self._no_logprobs("it returned no logprobs"))
        lo, hi = len(context), len(context + continuation)
        picked = [x for x, off in zip(lp.token_logprobs, lp.text_offset) if lo <= off < hi and x is not None]
        if not picked:
            raise CourseError(self._no_logprobs("its logprobs do not cover the prompt (no echo)"))
        return float(sum(picked)), len(picked)

    def check_logprobs(self) -> None:
        """One short request: raise the CourseError of ``_score`` now if the server gives no prompt logprobs."""
        self._score("The sky is", " blue")

    def _no_logprobs(self, why: str) -> str:
        return (f"mode='ppl' needs the prompt's token logprobs from {self.base_url}, but {why}. "
                "transformers serve ignores `echo`/`logprobs`; vLLM's server supports them. Use "
                "mode='gen' for this endpoint, or evaluate the model locally in ppl mode: "
                "evaluate('<registry name or folder>', ..., mode='ppl').")


def load_lm(model, *, abbr: str | None = None, adapter: str | os.PathLike | None = None,
            batch_size: int = 16, padding_side: str = "left", api_key: str | None = None):
    """A LocalLM/EndpointLM for a registry name, folder, ``(model, tokenizer)``, URL or ``serving`` server."""
    if hasattr(model, "render") and hasattr(model, "abbr"):  # already an LM (LocalLM, EndpointLM, ...)
        return model
    if hasattr(model, "base_url") and hasattr(model, "model"):  # a course_utils.serving.Server
        return EndpointLM(model.base_url, model=model.model, api_key=api_key or model.api_key,
                          abbr=abbr or f"api-{model.model}")
    if isinstance(model, str) and model.startswith(("http://", "https://")):
        return EndpointLM(model, abbr=abbr, api_key=api_key)
    if isinstance(model, tuple) and len(model) == 2:
        hf_model, tokenizer = model
    else:
        from .models import default_name, load_model

        model = model if model is not None else default_name("chat")
        hf_model, tokenizer = load_model(model)
        abbr = abbr or Path(str(model)).name
    if adapter is not None:
        from peft import PeftModel

        hf_model = PeftModel.from_pretrained(hf_model, str(adapter)).eval()
    return LocalLM(hf_model, tokenizer, abbr=abbr, batch_size=batch_size, padding_side=padding_side)


def weights_fingerprint(model) -> str:
    """A 12-digit hash of a model's weights, so two prediction sets can show they come from different weights.

    Up to 4096 evenly spaced values of every tensor (and every tensor's name, shape and dtype) are
    hashed: fast for any size, and a fine-tune, a merged or loaded adapter or quantization all change it.
    """
    import hashlib

    import torch

    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)].contiguous().cpu()
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())  # bytes: bf16 has no numpy dtype
    return digest.hexdigest()[:12]


# ---- inferencers -------------------------------------------------------------------------------
def _record_row(record: dict, data: EvalDataset, prediction, version: str, prompt, **extra) -> dict:
    gold = record[data.reader.output_column]
    return {"id": record["id"], "category": record["category"], "origin_prompt": prompt,
            "prediction": prediction, "gold": gold, "correct": prediction == gold,
            "version": version, **extra}


TARGETS = {  # what a ppl run scores after the prompt, and how an option's log-likelihood is normalised
    "letter": "the option letter after the listed options (C-Eval's ppl configs)",
    "text": "each option's text after the listed options, per token",
    "cloze": "each option's text after the question alone, summed (lm-eval's acc)",
    "cloze_norm": "each option's text after the question alone, per byte (lm-eval's acc_norm)",
}


def predict_ppl(lm, data: EvalDataset, records: list[dict], *, shots: int, style: str, version: str,
                target: str = "letter"):
    """PPL inferencer: score each option's answer after the prompt; the most likely option wins.

    ``target`` (see ``TARGETS``): "letter" scores " A".." D" after a prompt that lists the options;
    "text" scores each option's own words there, averaged per token. "cloze" and "cloze_norm" drop the
    option list, the formulation lm-evaluation-harness and OLMES use for small models: the option's
    text is the continuation of the question, scored by its total log-likelihood or per byte.
    """
    cloze = target in ("cloze", "cloze_norm")
    prompts = [lm.render(build_messages(r, data, shots=shots, mode="ppl", cloze=cloze), style, data.language)
               for r in records]
    pairs = [(p, answer_text(o if target == "letter" else str(r[o]), data.language, style))
             for r, p in zip(records, prompts) for o in OPTIONS]
    scored = lm.loglikelihood(pairs, style=style)
    if target == "cloze":
        scores = [total for total, _ in scored]
    elif target == "cloze_norm":
        scores = [total / len(cont.encode("utf-8")) for (total, _), (_, cont) in zip(scored, pairs)]
    else:
        scores = [total / max(n, 1) for total, n in scored]
    rows = []
    for i, (record, prompt) in enumerate(zip(records, prompts)):
        by_option = dict(zip(OPTIONS, scores[i * len(OPTIONS):(i + 1) * len(OPTIONS)]))
        best = max(OPTIONS, key=by_option.get)
        rows.append(_record_row(record, data, best, version, prompt,
                                scores={o: round(s, 4) for o, s in by_option.items()}))
    return rows


def predict_gen(lm, data: EvalDataset, records: list[dict], *, shots: int, style: str, version: str,
                max_out_len: int = 32):
    """Gen inferencer: generate a reply, then post-process it to an option letter (or None)."""
    prompts = [lm.render(build_messages(r, data, shots=shots, mode="gen"), style, data.language)
               for r in records]
    outputs = lm.generate(prompts, style=style, max_new_tokens=max_out_len)
    if style == "plain":  # a completion runs on into the next question; keep the first answer
        outputs = [o.strip().split("\n\n")[0] for o in outputs]
    return [_record_row(r, data, extract_choice(o, r), version, p, output=o)
            for r, p, o in zip(records, prompts, outputs)]


# ---- evaluators and the outputs folder ---------------------------------------------------------
@dataclass
class EvalResult:
    model: str
    dataset: str
    mode: str
    shots: int
    version: str
    accuracy: float  # percent, two decimals, as OpenCompass reports it
    by_category: dict
    num_questions: int
    seconds: float  # inference time in this call (0 when every prediction was reused)
    questions_per_s: float | None
    reused: int  # predictions read back from disk instead of computed
    out_dir: Path
    predictions_path: Path
    results_path: Path
    weights: str | None = None  # weights_fingerprint of the model that made the predictions

    @property
    def summary(self):
        """This result as an OpenCompass-shaped table (with per-category rows)."""
        return summary_table([self], categories=True)

    def predictions(self):
        """The stored predictions as a table."""
        return load_predictions(self.predictions_path)


def task_name(dataset: str, mode: str, shots: int, target: str = "letter") -> str:
    """The file stem for one evaluation, e.g. ``course_en_ppl_5shot`` or ``course_en_ppl_text``."""
    return (f"{dataset}_{mode}" + (f"_{target}" if mode == "ppl" and target != "letter" else "")
            + (f"_{shots}shot" if shots else ""))


def _run_dir(out_dir, reuse: bool) -> Path:
    if out_dir is not None:
        return Path(out_dir)
    if reuse:  # like OpenCompass's -r: continue the latest run
        runs = [p for p in runs_dir().glob("*") if (p / "predictions").is_dir()] if runs_dir().is_dir() else []
        if not runs:
            raise CourseError(f"reuse=True but there is no earlier run in {_rel(runs_dir())}. "
                              "Run once with reuse=False, or pass out_dir=<a run folder>.")
        return max(runs, key=lambda p: (p / "predictions").stat().st_mtime)
    return runs_dir() / datetime.now().strftime("%Y%m%d_%H%M%S")


def _rel(path: Path) -> str:
    """A path relative to the repo when it is inside it (outputs never show absolute paths)."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def _stored(path: Path, version: str) -> dict[str, dict]:
    """Predictions already on disk, by question id (an interrupted run leaves a prefix of them).

    A last line cut short by a stop is left out, so its question counts as not done and runs again.
    """
    if not path.is_file():
        return {}
    rows, _ = read_predictions(path, required=ROW_KEYS)
    stale = {r.get("version") for r in rows} - {version}
    if stale:
        raise CourseError(f"{_rel(path)} holds predictions made with another prompt or dataset version "
                          f"({', '.join(map(str, stale))}, now {version}). Use a new out_dir or reuse=False.")
    return {r["id"]: r for r in rows}


def _write_rows(path: Path, rows) -> None:
    """Replace the file in one step: a run stopped while rewriting keeps the old file whole."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def _known_abbr(model) -> str | None:
    """The name load_lm gives ``model`` when it is known without loading anything (else None)."""
    if hasattr(model, "render") and hasattr(model, "abbr"):
        return model.abbr
    if isinstance(model, (str, os.PathLike)) and not str(model).startswith(("http://", "https://")):
        return Path(str(model)).name
    return None


def _check_arguments(*, reuse, abbr, batch_size, max_out_len, padding_side) -> None:
    if not isinstance(reuse, bool):  # reuse="False" is a non-empty string, so it would mean True
        raise CourseError(f"reuse={reuse!r}: pass True (continue from stored predictions) or False.")
    if abbr is not None and (not isinstance(abbr, str) or not abbr.strip() or "/" in abbr or "\\" in abbr
                             or abbr in (".", "..")):
        raise CourseError(f"abbr={abbr!r}: give a short model name without slashes; it names the folder "
                          "predictions/<abbr>/ of the run.")
    for name, value in (("batch_size", batch_size), ("max_out_len", max_out_len)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise CourseError(f"{name}={value!r}: use a whole number of at least 1.")
    if padding_side not in ("left", "right"):
        raise CourseError(f"padding_side={padding_side!r}: use 'left' or 'right'.")


def _infer(lm, data: EvalDataset, todo: list[dict], path: Path, *, mode: str, shots: int, style: str,
           version: str, target: str, max_out_len: int, progress: bool, weights: str | None) -> float:
    """Run the inferencer batch by batch, appending predictions as they come (so a stop loses little)."""
    from .progress import progress as progress_bar

    path.parent.mkdir(parents=True, exist_ok=True)
    desc = f"{lm.abbr} {data.name} {mode}"
    with progress_bar(total=len(todo), desc=desc, unit="question", disable=not progress) as bar:
        start = time.perf_counter()
        for i in range(0, len(todo), lm.batch_size):
            chunk = todo[i:i + lm.batch_size]
            if mode == "ppl":
                rows = predict_ppl(lm, data, chunk, shots=shots, style=style, version=version, target=target)
            else:
                rows = predict_gen(lm, data, chunk, shots=shots, style=style, version=version,
                                   max_out_len=max_out_len)
            for row in rows:  # which weights made it: a new abbr alone does not make a new model
                row["weights"] = weights
            with open(path, "a", encoding="utf-8") as f:  # whole lines, so a stop can only tear the last one
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            bar.update(len(chunk))
    return time.perf_counter() - start


def _accuracy(rows: list[dict]) -> float:
    return round(100 * sum(r["correct"] for r in rows) / len(rows), 2) if rows else 0.0


def evaluate(model, dataset, *, mode: str = "ppl", shots: int = 0, style: str | None = None,
             target: str = "letter", test_range=None, out_dir=None, reuse: bool = False, abbr: str | None = None,
             adapter=None, batch_size: int = 16, max_out_len: int = 32, padding_side: str = "left",
             progress: bool = True) -> EvalResult:
    """Evaluate ``model`` on ``dataset`` in ``ppl`` or ``gen`` mode; returns accuracy, summary, paths.

    ``model``: a registry name, a folder, ``(model, tokenizer)``, an endpoint URL, a ``serving``
    server or a ``load_lm`` result. ``dataset``: a name under ``data/eval/`` or a JSONL path.
    ``style``: "chat" (the model's chat template) or "plain" (a completion prompt); by default
    plain for ppl and chat for gen. ``target`` (ppl): "letter", "text", "cloze" or "cloze_norm" (``TARGETS``).
    ``reuse=True`` reads stored predictions from ``out_dir`` (default:
    the latest run) and only runs the model for questions that have none. A last line that a
    stopped run left half-written counts as none; a damaged line elsewhere is an error.
    """
    if mode not in MODES:
        raise CourseError(f"mode={mode!r}: use 'ppl' (score the options) or 'gen' (generate, then extract).")
    style = style or ("plain" if mode == "ppl" else "chat")
    if style not in ("chat", "plain") or target not in TARGETS or (mode == "gen" and target != "letter"):
        raise CourseError(f"style={style!r}, target={target!r}: style is 'chat' or 'plain'; target (ppl only) "
                          f"is one of {', '.join(map(repr, TARGETS))}.")
    _check_arguments(reuse=reuse, abbr=abbr, batch_size=batch_size, max_out_len=max_out_len,
                     padding_side=padding_side)
    data = load_dataset(dataset, test_range=test_range)
    shots = check_shots(shots, data)
    version = prompt_version(data, mode=mode, shots=shots, style=style,
                             extra={"max_out_len": max_out_len} if mode == "gen" else {"target": target})
    run_dir, lm = _run_dir(out_dir, reuse), None
    # The name comes from the argument when it can, so a damaged predictions file is reported
    # before a model is loaded for nothing.
    abbr = abbr or _known_abbr(model)
    if abbr is None:
        lm = load_lm(model, adapter=adapter, batch_size=batch_size, padding_side=padding_side)
        abbr = lm.abbr
    task = task_name(data.name, mode, shots, target)
    pred_path = run_dir / "predictions" / abbr / f"{task}.jsonl"
    if not reuse:
        pred_path.unlink(missing_ok=True)
    done = _stored(pred_path, version)
    todo = [r for r in data.records if r["id"] not in done]
    seconds = 0.0
    if lm is None and hasattr(model, "render") and hasattr(model, "abbr"):
        lm = model  # a live model: its weights can be checked against the stored predictions' for free
    if todo:
        lm = lm or load_lm(model, abbr=abbr, adapter=adapter, batch_size=batch_size, padding_side=padding_side)
    weights = lm.fingerprint() if hasattr(lm, "fingerprint") else None
    _check_same_weights(done.values(), weights, pred_path)
    if todo and mode == "ppl" and hasattr(lm, "check_logprobs"):
        lm.check_logprobs()  # an endpoint without prompt logprobs fails here, before any question runs
    if todo:
        if pred_path.is_file():  # drop a torn last line first: new rows appended to it would be glued on
            _write_rows(pred_path, done.values())
        seconds = _infer(lm, data, todo, pred_path, mode=mode, shots=shots, style=style, version=version,
                         target=target, max_out_len=max_out_len, progress=progress, weights=weights)
        done = _stored(pred_path, version)
    rows = [done[r["id"]] for r in data.records]
    made_by = {r.get("weights") for r in rows}
    # The file ends up holding exactly this result's questions, once each, in dataset order (as
    # OpenCompass's does).
    _write_rows(pred_path, rows)
    categories = sorted({r["category"] for r in rows})
    result = EvalResult(
        model=abbr, dataset=data.name, mode=mode, shots=shots, version=version, accuracy=_accuracy(rows),
        by_category={c: _accuracy([r for r in rows if r["category"] == c]) for c in categories},
        num_questions=len(rows), seconds=round(seconds, 2),
        questions_per_s=round(len(todo) / seconds, 2) if seconds else None,
        reused=len(rows) - len(todo), out_dir=run_dir, predictions_path=pred_path,
        results_path=run_dir / "results" / abbr / f"{task}.json",
        weights=made_by.pop() if len(made_by) == 1 else None)
    _write_results(result, style=style, test_range=test_range)
    summarize(run_dir)
    return result


def _check_same_weights(rows, weights: str | None, path: Path) -> None:
    """Stored predictions made by other weights must not be reused as this model's (reuse=True)."""
    other = {r.get("weights") for r in rows} - {weights, None}
    if weights is not None and other:
        raise CourseError(f"{_rel(path)} holds predictions made by other weights (fingerprint "
                          f"{', '.join(sorted(other))}; this model's is {weights}), e.g. the model before "
                          "quantizing or fine-tuning. Give this model its own abbr=..., or use reuse=False.")


def _write_results(result: EvalResult, **config) -> None:
    record = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    for key in ("out_dir", "predictions_path", "results_path"):
        record[key] = _rel(record[key])
    record.update(config, test_range=None if config["test_range"] is None else str(config["test_range"]))
    result.results_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = result.results_path.with_name(result.results_path.name + ".tmp")
    tmp.write_text(json.dumps(record, ensure_ascii=False, indent=2), encoding="utf-8")
    os.replace(tmp, result.results_path)  # whole or not at all: summarize() reads every results file


# ---- the real OpenCompass config -----------------------------------------------------------------
# Registry names that OpenCompass ships a model config for (opencompass.configs.models.hf_internlm.*).
OC_MODEL_CONFIGS = {
    "internlm2_5-1_8b-chat": "hf_internlm2_5_1_8b_chat",
    "internlm2_5-7b-chat": "hf_internlm2_5_7b_chat",
    "internlm2-chat-1_8b": "hf_internlm2_chat_1_8b",
    "internlm3-8b-instruct": "hf_internlm3_8b_instruct",
}
OC_BENCHMARKS = ("ceval", "cmmlu", "mmlu")  # each has <name>_gen / <name>_ppl configs exporting <name>_datasets
INTERNSTUDIO_ROOT = "/share/new_models"


def _py(value) -> str:
    """Python source for a config value; ``type`` entries name classes, not strings."""
    if isinstance(value, dict):
        items = ", ".join(f"{k}={v if k == 'type' else _py(v)}" for k, v in value.items())
        return f"dict({items})"
    return repr(value)


def _oc_path(name: str) -> str:
    """Where OpenCompass should load a registry model: the share copy found here, else /share's path."""
    from .models import REGISTRY, locate

    place, folder = locate(name)
    return str(folder) if place == "share" else f"{INTERNSTUDIO_ROOT}/{REGISTRY[name].share_path}"


def _oc_model(model, index: int, mode: str, served_model: str, num_gpus: int) -> tuple[str | None, str]:
    """(read_base import line or None, Python expression for a list of model dicts)."""
    from .models import REGISTRY, locate

    name = str(model)
    # OpenCompass's HF classes read AutoConfig without trust_remote_code and then fall back to fp16
    # (after a 15 s prompt); an explicit dtype skips that. fp32 on a CPU, bf16 on a GPU.
    run = {"model_kwargs": {"torch_dtype": "bfloat16" if num_gpus else "float32"},
           "run_cfg": {"num_gpus": num_gpus}}
    if name.startswith(("http://", "https://")):
        if mode == "ppl":
            raise CourseError("An endpoint can only be evaluated in gen mode: OpenCompass's API models "
                              "have no ppl (BaseAPIModel.get_ppl raises NotImplementedError). Use "
                              "mode='gen', or pass the model folder for ppl.")
        spec = {"type": "OpenAISDK", "abbr": f"api-{served_model}", "path": served_model, "key": "EMPTY",
                "openai_api_base": name if name.rstrip("/").endswith("/v1") else name.rstrip("/") + "/v1",
                "meta_template": {"round": [{"role": "HUMAN", "api_role": "HUMAN"},
                                            {"role": "BOT", "api_role": "BOT", "generate": True}]},
                "max_out_len": 256, "batch_size": 8, "temperature": 0.0}
        tokenizer = locate(served_model)[1] if served_model in REGISTRY else None
        if tokenizer is not None:
            spec["tokenizer_path"] = str(tokenizer)  # else tiktoken downloads gpt-4's
        return None, f"[{_py(spec)}]"
    if name in OC_MODEL_CONFIGS and mode == "gen":  # OpenCompass's own chat config, pointed at /share
        var = f"{OC_MODEL_CONFIGS[name]}_model"
        line = f"from opencompass.configs.models.hf_internlm.{OC_MODEL_CONFIGS[name]} import models as {var}"
        settings = ", ".join(f"{k}={_py(v)}" for k, v in {"path": _oc_path(name), **run}.items())
        return line, f"[dict(m, {settings}) for m in {var}]"
    # ppl scores each option with the plain model: only HuggingFaceBaseModel has get_ppl.
    if name in OC_MODEL_CONFIGS:
        path = _oc_path(name)
    elif name in REGISTRY:  # the copy this machine already has (offline), else the hub id
        path = str(locate(name)[1] or REGISTRY[name].hf_id)
    else:
        path = name
    spec = {"type": "HuggingFaceBaseModel" if mode == "ppl" else "HuggingFacewithChatTemplate",
            "abbr": name if name in REGISTRY else Path(name).name or f"model{index}", "path": path,
            "max_out_len": 256, "batch_size": 8, **run}
    return None, f"[{_py(spec)}]"


def _oc_dataset(dataset: str, mode: str, test_range, data_root: str) -> tuple[str | None, str]:
    """(read_base import line or None, Python expression for a list of dataset dicts)."""
    if dataset in OC_BENCHMARKS:
        line = f"from opencompass.configs.datasets.{dataset}.{dataset}_{mode} import {dataset}_datasets"
        return line, f"{dataset}_datasets"
    test_file, meta = locate_dataset(dataset)
    split = meta.get("reader_cfg", {}).get("test_split", "val")
    name = meta.get("abbr", test_file.stem)
    # OpenCompass's custom-dataset format: C-Eval columns are read as multiple choice (data_type mcq).
    spec = {"abbr": name, "path": f"{data_root}/{name}/{split}.jsonl" if name in list_datasets() else str(test_file),
            "data_type": "mcq", "infer_method": mode}
    if test_range is not None:
        spec["test_range"] = test_range
    return None, f"[{_py(spec)}]"


def _default_gpus() -> int:
    import torch

    return 1 if torch.cuda.is_available() else 0


def _splat(exprs: list[str]) -> str:
    """The items of a list display that concatenates list expressions: ``*a, *b``."""
    return ", ".join(f"*{e}" for e in exprs)


def _read_base_block(imports: list[str]) -> str:
    """The ``read_base()`` block of OpenCompass's own configs, or nothing: mmengine refuses an empty one."""
    if not imports:
        return ""
    return "from mmengine.config import read_base\n\nwith read_base():\n" + "".join(f"    {i}\n" for i in imports)


def _slice_block(benchmarks: list[str], test_range: str | None) -> str:
    """The loop that sets ``test_range`` on built-in benchmarks (their configs come without one), or nothing."""
    if not benchmarks:
        return ""
    return ("\n# Evaluate a slice of each benchmark (OpenCompass's test_range), as the lesson does.\n"
            f"for _d in [{_splat(benchmarks)}]:\n    _d['reader_cfg']['test_range'] = {test_range!r}\n")


def export_opencompass_config(models, datasets, path, *, mode: str = "gen", test_range: str | None = None,
                              work_dir: str = "./outputs/course_eval", data_root: str = "data/eval",
                              served_model: str = "internlm2_5-1_8b-chat", num_gpus: int | None = None) -> str:
    """Write a real OpenCompass config evaluating ``models`` on ``datasets``; returns the command to run it.

    ``models``: registry names (InternLM ones import OpenCompass's own configs in gen mode, pointed
    at the InternStudio copies), folders (``HuggingFacewithChatTemplate``; ``HuggingFaceBaseModel``
    for ppl) or endpoint URLs (``OpenAISDK``, gen only). ``datasets``: "ceval", "cmmlu", "mmlu"
    (``<name>_gen``/``<name>_ppl`` configs) or course sets from ``data/eval/`` (custom mcq datasets).
    ``test_range`` (e.g. "[0:20]") goes into every reader_cfg. ``num_gpus`` per model: 1 on a CUDA
    machine, 0 (the CPU) otherwise.
    """
    if mode not in ("gen", "ppl"):
        raise CourseError(f"mode={mode!r}: OpenCompass configs exist for 'gen' and 'ppl'.")
    if isinstance(models, (str, Path)):
        models = [models]
    if isinstance(datasets, (str, Path)):
        datasets = [datasets]
    if test_range is not None:
        parse_range(test_range, 0)  # the same syntax check OpenCompass would fail on later
    num_gpus = _default_gpus() if num_gpus is None else num_gpus
    path = Path(path)
    try:  # inside the repo, name the config by its repo-relative path (no home folders in outputs)
        shown = path.resolve().relative_to(REPO_ROOT)
    except ValueError:
        shown = path
    command = f"opencompass {shown} --debug"
    imports, model_exprs, data_exprs, ranged = [], [], [], []
    for i, model in enumerate(models):
        line, expr = _oc_model(model, i, mode, served_model, num_gpus)
        imports += [line] if line else []
        model_exprs.append(expr)
    for dataset in datasets:
        line, expr = _oc_dataset(str(dataset), mode, test_range, data_root)
        imports += [line] if line else []
        data_exprs.append(expr)
        ranged += [expr] if line and test_range is not None else []
    from .env import read_pins

    values = dict(version=read_pins(REPO_ROOT / "requirements" / "gpu.txt")["opencompass"], command=command,
                  data_root=data_root, read_base=_read_base_block(imports), datasets=_splat(data_exprs),
                  models=_splat(model_exprs), benchmark_slice=_slice_block(ranged, test_range),
                  work_dir=repr(work_dir))
    template = Template((DATA_DIR / "eval" / "opencompass_config.py.tmpl").read_text(encoding="utf-8"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template.substitute(values), encoding="utf-8")
    return command
