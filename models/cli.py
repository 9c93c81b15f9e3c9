"""Shared argparse ``type=`` validators and error handling for the ``models`` command lines.

Every numeric flag of ``models.train`` / ``models.sample`` / ``models.evaluate`` is parsed by one of these, so a
value that would do harm (a negative step count, a probability of 2, ...) is refused at parse time; argparse prints
``argument --flag: <why>`` and exits with status 2. Each message states the valid range.

    positive_int, nonneg_int, int_at_least(n), int_in(lo, hi)   integers (no "2.5", no "1e3")
    train_seed, sampling_seed                             seeds in the range every derived generator seed fits
    device                                                a torch device that exists here
    positive_float, nonneg_float, float_in(lo, hi, ...)   finite floats (nan / inf refused unless allowed)
    probability (0 <= p <= 1), dropout_rate (0 <= p < 1)
    fraction_or_steps                                     a step count (int >= 0) or a fraction of the run in [0, 1)

:class:`UsageError` is for a bad request found after parsing (e.g. ``--classes 12`` for a 10-class model);
:func:`run_main` turns it, and checkpoint errors, into a one-line message and exit status 2 instead of a traceback.
:func:`init_distributed` joins the ``torchrun`` process group (the multi-process commands share it).
``models.sample`` and ``models.evaluate`` share :func:`add_model_source_args` / :func:`load_model` (``--ckpt`` or a
LlamaGen ``--gpt-ckpt``), :func:`add_sampling_args` / :func:`sampling_kwargs` and :func:`check_sampling_request`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


class UsageError(ValueError):
    """A command-line request that cannot be honoured; the message names the flag."""


def int_in(lo: int, hi: int | None = None):
    """An integer in [lo, hi] (``hi`` None: unbounded)."""
    valid = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"

    def parse(value: str) -> int:
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer {valid}, got {value!r}") from None
        if number < lo or (hi is not None and number > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {valid}, got {number}")
        return number

    parse.__name__ = f"int_{valid}"
    return parse


def int_at_least(lo: int):
    return int_in(lo)


positive_int = int_at_least(1)
nonneg_int = int_at_least(0)
# Seeds are mixed into 64-bit generator seeds (e.g. (seed * 1_000_003 + epoch) * 10_000_019 + index for the crops of
# llamagen-codes): bounded so that every such product stays below torch's 2**64 limit.
train_seed = int_in(0, 2 ** 20 - 1)
sampling_seed = int_in(0, 2 ** 32 - 1)


def device(value: str) -> str:
    """argparse type of ``--device``: a torch device string whose device exists here."""
    import torch

    try:
        dev = torch.device(value)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a device such as cpu, cuda or cuda:1, got {value!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{value!r}: no CUDA device is available here (use --device cpu)")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{value!r}: there are {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return value


def _interval(lo, hi, lo_open, hi_open) -> str:
    left = "-inf" if lo is None else repr(lo)
    right = "inf" if hi is None else repr(hi)
    return f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"


def float_in(lo=None, hi=None, *, lo_open: bool = False, hi_open: bool = False, allow_inf: bool = False):
    """A float in the interval from ``lo`` to ``hi`` (``None``: unbounded; ``*_open``: that end excluded)."""
    interval = _interval(lo, hi, lo_open, hi_open)

    def parse(value: str) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number in {interval}, got {value!r}") from None
        if math.isnan(number) or (math.isinf(number) and not allow_inf):
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {value!r}")
        if ((lo is not None and (number < lo or (lo_open and number == lo)))
                or (hi is not None and (number > hi or (hi_open and number == hi)))):
            raise argparse.ArgumentTypeError(f"must be in {interval}, got {number:g}")
        return number

    parse.__name__ = f"float_in_{interval}"
    return parse


positive_float = float_in(0.0, lo_open=True)
nonneg_float = float_in(0.0)
probability = float_in(0.0, 1.0)
dropout_rate = float_in(0.0, 1.0, hi_open=True)  # p = 1 drops everything: nothing would be learned


def parse_fraction_or_steps(value: str) -> float | int:
    """``"15"`` -> 15 steps; ``"0.05"`` -> the fraction 0.05 of the run. Raises ``ValueError`` otherwise."""
    text = str(value).strip()
    try:
        return int(text)  # steps; int() refuses "2.5" and "1e3"
    except ValueError:
        pass
    number = float(text)  # ValueError for non-numbers
    if not 0.0 <= number < 1.0:
        raise ValueError(f"a fraction of the run must be in [0, 1) and a step count an integer >= 0, got {value!r}")
    return number


def fraction_or_steps(value: str) -> str:
    """argparse type: a step count (integer >= 0) or a fraction of the run in [0, 1); returns the text unchanged
    (resolved against ``--steps`` later)."""
    try:
        number = parse_fraction_or_steps(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count (integer >= 0) or a fraction of the run in [0, 1), "
                                         f"got {value!r}") from None
    if isinstance(number, int) and number < 0:
        raise argparse.ArgumentTypeError(f"a step count must be >= 0, got {number}")
    return str(value).strip()


def run_main(main, prog: str) -> None:
    """Run ``main()`` as a command: a :class:`UsageError` or a checkpoint error becomes ``prog: error: ...`` on
    stderr and exit status 2 (the message already says what is wrong; a traceback would only bury it)."""
    from .checkpoint import CheckpointError

    try:
        main()
    except (UsageError, CheckpointError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)


def init_distributed(device_name: str):
    """(rank, world_size, device). Under ``torchrun`` (WORLD_SIZE > 1) joins the process group: NCCL on GPUs,
    gloo on CPUs. Shared by ``models.train`` and ``models.evaluate`` (sampling sharded over ranks)."""
    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, torch.device(device_name)
    import torch.distributed as dist

    device = torch.device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world, device


# The model-source and sampling flags of models.sample and models.evaluate, and what they resolve to (the GPT
# is imported when asked for, so that the commands that never sample do not load it).


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags of ``models.sample`` and ``models.evaluate``, each validated at parse time."""
    p.add_argument("--cfg", type=float_in(1.0), default=2.0, help="classifier-free guidance scale >= 1 (1 = off; "
                   "> 1 needs a model trained with --class-dropout > 0)")
    p.add_argument("--temperature", type=float_in(0.0), default=1.0, help=">= 0 (0 = greedy)")
    p.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus in [0, 1] (1 = off, 0 = greedy)")
    p.add_argument("--speculative", choices=["none", "jacobi"], default="none", help="jacobi: lossless speculative "
                   "Jacobi decoding (the same distribution in fewer model calls; models/sampling/speculative.py)")
    p.add_argument("--window", type=int_at_least(2), default=16, help="--speculative jacobi: tokens verified per "
                   "model call (the last token + window - 1 drafts), >= 2")
    p.add_argument("--draft-init", choices=["prior", "left", "random", "prior-reset", "left-reset", "adaptive"],
                   default="adaptive",
                   help="--speculative jacobi: drafts start as the token above (prior), the token to the left (left) "
                   "or uniform random tokens; -reset: the window redrafted from that prior after every call instead "
                   "of the Jacobi redraft; adaptive: copy from the neighbour offset that agrees best with the tokens "
                   "so far")


def sampling_kwargs(args) -> dict:
    """The :func:`models.sampling.generate.generate` keywords that :func:`add_sampling_args`'s flags resolve to."""
    kwargs = dict(cfg_scale=args.cfg, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.speculative == "jacobi":
        kwargs.update(speculative="jacobi", window=args.window, draft_init=args.draft_init)
    return kwargs


def add_model_source_args(p: argparse.ArgumentParser) -> None:
    """``--ckpt`` (ours) or ``--gpt-ckpt`` (a LlamaGen c2i GPT checkpoint, with LlamaGen's sample_c2i flags), for
    ``models.sample`` and ``models.evaluate``."""
    from .nets.gpt import PRESETS

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="model.pt (sampling) or last.pt (uses its EMA weights)")
    src.add_argument("--gpt-ckpt", help="a LlamaGen class-conditional GPT checkpoint (e.g. c2i_B_256.pt), with "
                     "--gpt-model and --image-size as in LlamaGen's sample_c2i.py")
    p.add_argument("--gpt-model", choices=[k for k in PRESETS if k.startswith("GPT-")] + [k for k in PRESETS
                   if not k.startswith("GPT-")], default=None, help="--gpt-ckpt's architecture (default: from the "
                   "checkpoint's stored args)")
    p.add_argument("--image-size", type=positive_int, default=None, help="--gpt-ckpt: image side in pixels "
                   "(256, 384, 512; default: from the checkpoint's stored args)")
    p.add_argument("--downsample-size", type=positive_int, default=16, help="--gpt-ckpt: VQ downsampling (16)")
    p.add_argument("--codebook-size", type=positive_int, default=16384, help="--gpt-ckpt: VQ codebook (vocab) size")
    p.add_argument("--num-classes", type=positive_int, default=None, help="--gpt-ckpt: classes (default: from "
                   "the class table)")
    p.add_argument("--cls-token-num", type=positive_int, default=1, help="--gpt-ckpt: class prefix length (1)")


def load_model(args, device):
    """The GPT ``args`` name: ours (``--ckpt``) or LlamaGen's (``--gpt-ckpt``)."""
    from .nets.gpt import load_llamagen_gpt, load_sampling_model

    if getattr(args, "gpt_ckpt", None):
        return load_llamagen_gpt(args.gpt_ckpt, gpt_model=args.gpt_model, image_size=args.image_size,
                                 downsample_size=args.downsample_size, codebook_size=args.codebook_size,
                                 num_classes=args.num_classes, cls_token_num=args.cls_token_num, device=device)
    return load_sampling_model(args.ckpt, device)


def has_null_class(model) -> bool:
    """Whether ``model`` has the null-class embedding row that classifier-free guidance samples from (trained
    with class dropout > 0)."""
    table = model.cls_embedding.embedding_table
    return table.num_embeddings > model.config.num_classes


def check_sampling_request(model, *, cfg: float, classes=()) -> None:
    """Refuse, naming the flag, what ``model`` cannot sample: a class index it does not have, or guidance
    (``--cfg`` > 1) without a null class (``generate`` would fail deep inside with an IndexError)."""
    num_classes = model.config.num_classes
    bad = [c for c in classes or () if not 0 <= c < num_classes]
    if bad:
        raise UsageError(f"--classes {bad}: this model has {num_classes} classes (valid: 0..{num_classes - 1})")
    if cfg > 1.0 and not has_null_class(model):
        raise UsageError(f"--cfg {cfg:g} needs the null class of classifier-free guidance, and this model has none "
                         f"(it was trained with --class-dropout 0): pass --cfg 1 to sample without guidance")
