"""Sample images from a trained GPT and write a PNG grid plus the tokens.

    python -m models.sample --ckpt runs/x/model.pt --cfg 2.0 --n 40 --out runs/x/samples.png

Labels cycle through the classes (``--classes`` picks some). Tokens are decoded with the built-in palette
tokenizer; the tokens and labels are also saved next to the PNG (``.pt``).
"""

from __future__ import annotations

import argparse
import os

import torch

from .data import CLASS_NAMES, satisfies_rule
from .generate import generate
from .tokenizer import PaletteTokenizer, image_grid, write_png
from .train import load_sampling_model


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="model.pt (sampling) or last.pt (uses its EMA weights)")
    p.add_argument("--out", default=None, help="PNG path (default: next to the checkpoint, samples.png)")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--classes", type=int, nargs="*", default=None)
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--scale", type=int, default=8, help="pixels per token in the PNG")
    p.add_argument("--vq-ckpt", default=None, help="a local LlamaGen VQ checkpoint (vq_ds16_c2i.pt) to decode "
                   "ImageNet codes; default: the built-in palette tokenizer")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    model = load_sampling_model(args.ckpt, args.device)
    config = model.config
    classes = args.classes if args.classes else list(range(config.num_classes))
    labels = torch.tensor([classes[i % len(classes)] for i in range(args.n)])
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    tokens = torch.cat([
        generate(model, labels[i: i + args.batch_size], cfg_scale=args.cfg, temperature=args.temperature,
                 top_k=args.top_k, top_p=args.top_p, generator=generator).cpu()
        for i in range(0, args.n, args.batch_size)
    ])
    if args.vq_ckpt:
        from .vq import VQTokenizer

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
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples.png")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_png(out, image_grid(images, ncols=len(classes) if len(classes) <= 16 else 8, scale=args.scale))
    torch.save({"tokens": tokens, "labels": labels, "grid": config.grid}, os.path.splitext(out)[0] + ".pt")
    if config.num_classes == len(CLASS_NAMES):
        ok = sum(satisfies_rule(t.view(*config.grid), int(l)) for t, l in zip(tokens, labels))
        print(f"structure: {ok}/{args.n} samples obey their class's rule")
    print(f"wrote {out} ({args.n} samples, one column per class)")


if __name__ == "__main__":
    main()
