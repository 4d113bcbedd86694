"""LMDeploy's ``lite auto_awq`` (W4A16) as a checked job, calibrated on a local text file.

Why a local calibration file: ``auto_awq --calib-dataset wikitext2|ptb|c4|pileval`` downloads
the data set from the Hugging Face hub at run time, which fails on an offline or firewalled
machine (a common InternStudio failure). :func:`run_auto_awq` feeds LMDeploy's own AWQ code
blocks cut from a local text file instead; ``python -m course_utils.lmdeploy_awq auto_awq MODEL
--work-dir OUT`` does the same from a terminal.

Written for the pinned LMDeploy (0.10.2, requirements/gpu.txt). The CI simulation stage parses
:func:`auto_awq_cli` with LMDeploy's own parser and runs :func:`run_auto_awq` for real on a CPU
(LMDeploy's ``lite`` is plain PyTorch). Serving the result is :mod:`course_utils.lmdeploy_lite`.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import CourseError
from .lmdeploy_lite import require_lmdeploy
from .paths import DATA_DIR

# The hub data set `lmdeploy lite auto_awq` downloads; a name its calibrate() accepts (0.10 to 0.18).
ONLINE_CALIB = "wikitext2"


@dataclass
class AwqJob:
    model: str  # a Hugging Face folder, e.g. /share/new_models/Shanghai_AI_Laboratory/internlm2_5-1_8b-chat
    work_dir: str  # where the 4-bit model is written (then served with model_format="awq")
    calib_file: str = str(DATA_DIR / "ppl" / "calib.txt")  # local text: no hub download
    calib_samples: int = 128  # at most this many blocks of calib_seqlen tokens
    calib_seqlen: int = 2048  # tokens per block (shorter if the file is shorter)
    w_bits: int = 4
    w_group_size: int = 128
    batch_size: int = 1  # calibration batch; lower it if the GPU runs out of memory
    search_scale: bool = False  # True: search AWQ ratios (slower); False: LMDeploy's fixed smoothing
    dtype: str = "auto"  # float16, bfloat16 or auto (from the checkpoint)
    device: str = "cuda"  # "cpu" works too (LMDeploy's lite is PyTorch), at CPU speed


def check_job(job: AwqJob) -> AwqJob:
    """Validate an :class:`AwqJob` (bits, group size, calibration file) and return it."""
    if job.w_bits != 4:
        raise CourseError(f"w_bits={job.w_bits}: LMDeploy's AWQ path (TurboMind W4A16) takes 4.")
    if job.w_group_size not in (32, 64, 128, 256):
        raise CourseError(f"w_group_size={job.w_group_size}: TurboMind kernels take 32, 64, 128 or 256.")
    if job.calib_samples < 1 or job.calib_seqlen < 16:
        raise CourseError("calib_samples must be >= 1 and calib_seqlen >= 16 tokens.")
    if not Path(job.calib_file).is_file():
        raise CourseError(f"Calibration file {Path(job.calib_file).name!r} not found: pass "
                          "calib_file= a UTF-8 text file (data/ppl/calib.txt ships with the course).")
    if job.dtype not in ("auto", "float16", "bfloat16"):
        raise CourseError(f"dtype={job.dtype!r}: use 'auto', 'float16' or 'bfloat16'.")
    if job.device not in ("cuda", "cpu"):
        raise CourseError(f"device={job.device!r}: use 'cuda' or 'cpu'.")
    return job


def auto_awq_cli(job: AwqJob) -> list[str]:
    """The plain ``lmdeploy lite auto_awq`` command (downloads wikitext2 from the hub: online only)."""
    check_job(job)
    cmd = ["lmdeploy", "lite", "auto_awq", job.model, "--work-dir", job.work_dir,
           "--calib-dataset", ONLINE_CALIB, "--calib-samples", str(job.calib_samples),
           "--calib-seqlen", str(job.calib_seqlen), "--batch-size", str(job.batch_size),
           "--w-bits", str(job.w_bits), "--w-group-size", str(job.w_group_size), "--dtype", job.dtype,
           "--device", job.device]
    return cmd + (["--search-scale"] if job.search_scale else [])


def offline_awq_command(job: AwqJob) -> list[str]:
    """The same job with local calibration text, as a command (this module's ``__main__``)."""
    check_job(job)
    cmd = [sys.executable, "-m", "course_utils.lmdeploy_awq", "auto_awq", job.model,
           "--work-dir", job.work_dir, "--calib-file", job.calib_file,
           "--calib-samples", str(job.calib_samples), "--calib-seqlen", str(job.calib_seqlen),
           "--batch-size", str(job.batch_size), "--w-group-size", str(job.w_group_size),
           "--dtype", job.dtype, "--device", job.device]
    return cmd + (["--search-scale"] if job.search_scale else [])


def auto_awq_kwargs(job: AwqJob) -> dict:
    """Keyword arguments for ``lmdeploy.lite.apis.auto_awq.auto_awq``.

    ``calib_dataset`` is set only because LMDeploy asserts a known name; the loader that would
    download it is replaced by :func:`local_calib_loader`.
    """
    check_job(job)
    kwargs = asdict(job)
    kwargs.pop("calib_file")
    return {**kwargs, "calib_dataset": ONLINE_CALIB}


def calib_blocks(tokenizer, path: str | Path, nsamples: int = 128, seqlen: int = 2048) -> list:
    """Cut a text file into at most ``nsamples`` blocks of ``seqlen`` tokens: [(1, seqlen) tensors].

    A file shorter than one block gives a single block of all its tokens (printed as a note).
    """
    import torch

    text = Path(path).read_text(encoding="utf-8")
    ids = tokenizer(text, return_tensors="pt").input_ids[0]  # (tokens,)
    if len(ids) < 16:
        raise CourseError(f"{Path(path).name} has only {len(ids)} tokens: calibration needs real text.")
    if len(ids) < seqlen:
        print(f"Calibration: {len(ids)} tokens < calib_seqlen={seqlen}, using one block of {len(ids)}.")
        seqlen = len(ids)
    n = min(nsamples, len(ids) // seqlen)
    return [ids[i * seqlen:(i + 1) * seqlen].unsqueeze(0).to(torch.long) for i in range(n)]


def local_calib_loader(path: str | Path):
    """A drop-in for LMDeploy's ``get_calib_loaders`` that reads ``path`` instead of the hub.

    LMDeploy 0.10's ``calibrate`` unpacks ``(train_blocks, test_data)`` and concatenates the blocks.
    """

    def get_calib_loaders(name, tokenizer, nsamples=128, seed=0, seqlen=2048):
        return calib_blocks(tokenizer, path, nsamples, seqlen), None

    return get_calib_loaders


def run_auto_awq(job: AwqJob) -> Path:
    """Run LMDeploy's ``auto_awq`` with local calibration text; returns the work dir."""
    check_job(job)
    require_lmdeploy("lmdeploy lite auto_awq", job.device)
    import lmdeploy.lite.apis.calibrate as calibrate
    from lmdeploy.lite.apis.auto_awq import auto_awq

    if not hasattr(calibrate, "get_calib_loaders"):
        raise CourseError("This LMDeploy version loads calibration data differently: use the plain "
                          "command from auto_awq_cli(job) with network access, or the pinned "
                          "lmdeploy (requirements/gpu.txt).")
    original = calibrate.get_calib_loaders
    calibrate.get_calib_loaders = local_calib_loader(job.calib_file)
    try:
        auto_awq(job.model, **{k: v for k, v in auto_awq_kwargs(job).items() if k != "model"})
    finally:
        calibrate.get_calib_loaders = original
    return Path(job.work_dir)


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m course_utils.lmdeploy_awq",
                                     description="LMDeploy auto_awq with local calibration text.")
    sub = parser.add_subparsers(dest="command", required=True)
    awq = sub.add_parser("auto_awq")
    awq.add_argument("model")
    awq.add_argument("--work-dir", required=True)
    for name, default in (("calib-file", AwqJob.calib_file), ("dtype", "auto"), ("device", "cuda")):
        awq.add_argument(f"--{name}", default=default)
    for name, default in (("calib-samples", 128), ("calib-seqlen", 2048), ("batch-size", 1),
                          ("w-group-size", 128)):
        awq.add_argument(f"--{name}", type=int, default=default)
    awq.add_argument("--search-scale", action="store_true")
    args = vars(parser.parse_args(argv))
    args.pop("command")
    print(run_auto_awq(AwqJob(**{k.replace("-", "_"): v for k, v in args.items()})))


if __name__ == "__main__":
    _main()
