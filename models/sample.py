"""Sample images from a trained GPT and write a PNG grid plus the tokens.

    python -m models.sample --ckpt runs/x/model.pt --cfg 2.0 --n 40 --out runs/x/samples.png

Labels cycle through the classes (``--classes`` picks some). Tokens are decoded with the built-in palette
tokenizer; the tokens and labels are also saved next to the PNG (``.pt``).
"""

from __future__ import annotations

import argparse
import os

import torch

from .checkpoint import atomic_save
from .cli import (UsageError, device, float_in, int_at_least, nonneg_int, positive_int, probability, run_main,
                  sampling_seed)
from .data.shapes import CLASS_NAMES, satisfies_rule
from .sampling.generate import generate
from .data.tokenizer import PaletteTokenizer, image_grid, write_png
from .nets.gpt import PRESETS, load_llamagen_gpt, load_sampling_model


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling flags shared with :mod:`models.evaluate`, each validated at parse time."""
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
    """``--ckpt`` (ours) or ``--gpt-ckpt`` (a LlamaGen c2i GPT checkpoint, with LlamaGen's sample_c2i flags), shared
    with :mod:`models.evaluate`."""
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)
    p.add_argument("--out", default=None, help="PNG path (default: next to the checkpoint, samples.png)")
    p.add_argument("--n", type=positive_int, default=40)
    p.add_argument("--classes", type=nonneg_int, nargs="*", default=None)
    add_sampling_args(p)
    p.add_argument("--seed", type=sampling_seed, default=0)
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--scale", type=positive_int, default=8, help="pixels per token in the PNG")
    p.add_argument("--vq-ckpt", default=None, help="a local LlamaGen VQ checkpoint (vq_ds16_c2i.pt) to decode "
                   "ImageNet codes; default: the built-in palette tokenizer")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.out and os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a directory: pass the PNG file's path")
    model = load_model(args, args.device)
    config = model.config
    check_sampling_request(model, cfg=args.cfg, classes=args.classes)
    classes = args.classes if args.classes else list(range(config.num_classes))
    labels = torch.tensor([classes[i % len(classes)] for i in range(args.n)])
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    tokens = torch.cat([
        generate(model, labels[i: i + args.batch_size], generator=generator, **sampling_kwargs(args)).cpu()
        for i in range(0, args.n, args.batch_size)
    ])
    if args.vq_ckpt:
        from .nets.vq import VQTokenizer

        vq = VQTokenizer.from_checkpoint(args.vq_ckpt).to(args.device)
        with torch.no_grad():
            pixels = vq.decode(tokens.to(args.device), config.grid).cpu()
        images = ((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
        args.scale = 1
    else:
        tokenizer = PaletteTokenizer()
        if config.vocab_size != tokenizer.vocab_size:
            raise ValueError(f"this model has a {config.vocab_size}-token vocabulary; the built-in palette tokenizer "
                             f"decodes {tokenizer.vocab_size}: pass --vq-ckpt for VQ codes")
        images = tokenizer.decode(tokens, config.grid)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt or args.gpt_ckpt)), "samples.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_png(out, image_grid(images, ncols=len(classes) if len(classes) <= 16 else 8, scale=args.scale))
    atomic_save({"tokens": tokens, "labels": labels, "grid": config.grid}, os.path.splitext(out)[0] + ".pt")
    if config.num_classes == len(CLASS_NAMES):
        ok = sum(satisfies_rule(t.view(*config.grid), int(l)) for t, l in zip(tokens, labels))
        # What the number means: each built-in class is a rule the whole grid must follow (mirror symmetry, stripes,
        # a frame...), so it needs the long-range structure raster AR models find hard; the data scores 100%.
        print(f"structure: {ok}/{args.n} samples obey their class's rule ({100 * ok / max(args.n, 1):.0f}%; the "
              f"training data obeys it 100%, unstructured noise about 0%)")
    print(f"wrote {os.path.abspath(out)} ({args.n} samples, one column per class: "
          f"{', '.join(CLASS_NAMES[c] for c in classes) if config.num_classes == len(CLASS_NAMES) else 'class ids ' + str(classes)})")


if __name__ == "__main__":
    run_main(main, "models.sample")
