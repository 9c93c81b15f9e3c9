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
from .cli import (UsageError, add_model_source_args, add_sampling_args, check_sampling_request, device, load_model,
                  nonneg_int, positive_int, run_main, sampling_kwargs, sampling_seed)
from .data.shapes import CLASS_NAMES, satisfies_rule
from .data.tokenizer import PaletteTokenizer, image_grid, write_png
from .sampling.generate import generate


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
