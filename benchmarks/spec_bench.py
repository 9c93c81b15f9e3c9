"""Speculative Jacobi decoding vs plain sampling: model calls per image and wall time, side by side in one process.

    python benchmarks/spec_bench.py --ckpt runs/x/model.pt --windows 4,8,16,32 --inits prior,random --json out.json
    python benchmarks/spec_bench.py --model GPT-B --grid 16 --images 8      # random weights, output layer randomised
    python benchmarks/spec_bench.py --ckpt models/pretrained/shapes8-micro/model.pt --cfg-scale 2 --quality-n 1000

``--quality-n`` also scores plain and speculative samples (FID / KID / structure on the built-in classifier's
features, 3 sampling seeds each): the seed spread is what "the same quality" is measured against.

Calls per image count every forward of the GPT a row needed until its last token (the class-prefix prefill
included): H*W for plain sampling, 1 + window calls for speculative decoding (per row: rows finish at different
calls; a batch runs until its slowest row). Device-independent; the mean, quantiles and histogram go to the JSON.
Wall time is one whole batch generation (after one warm-up generation), synchronised; on CPU a window call costs
more compute than a one-token call, so the time ratio there is not the GPU's (memory-bound decoding).
A random-weight model gets its output layer randomised (the GPT zero-initialises it, which makes every
conditional uniform and the acceptance meaningless).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from common import add_common_args, environment, setup_from_args, write_json  # noqa: F401  (sys.path set there)


def build_model(args, device):
    from models.nets.gpt import build_gpt, load_sampling_model

    if args.ckpt:
        return load_sampling_model(args.ckpt, device)
    torch.manual_seed(args.seed)
    model = build_gpt(args.model, grid=args.grid, vocab_size=args.vocab, num_classes=args.num_classes)
    with torch.no_grad():
        torch.nn.init.normal_(model.output.weight, std=args.output_std)
    return model.to(device).eval()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """``fn()``, its wall seconds and this process's CPU seconds (all threads)."""
    _sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - start, time.process_time() - cpu


def spread(values):
    t = torch.tensor(values, dtype=torch.float64)
    return dict(mean=float(t.mean()), std=float(t.std()) if len(values) > 1 else 0.0, values=list(values))


@torch.no_grad()
def entropy_nats(model, labels, tokens, cfg_scale, temperature):
    """Mean entropy (nats) of the sampling distributions along ``tokens`` (teacher-forced, guidance and temperature
    as sampled; top-k/top-p ignored): how peaked the model is, which is what acceptance depends on."""
    logits, _ = model(tokens[:, :-1], labels)
    if cfg_scale > 1:
        uncond, _ = model(tokens[:, :-1], torch.full_like(labels, model.null_class))
        logits = uncond + cfg_scale * (logits - uncond)
    logp = (logits.float() / max(temperature, 1e-6)).log_softmax(-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def quality(model, settings, args, device, sampling):
    """FID / KID / structure (built-in classifier features, models.evaluate.Scorer) of plain and speculative samples
    of the same labels, per sampling seed: the seed spread is the yardstick for "same quality"."""
    from models.evaluate import Scorer, class_labels, sample_tokens

    config = model.config
    scorer = Scorer(args.data, config.grid, data_seed=args.data_seed, num_classes=config.num_classes,
                    cache_dir=args.cache_dir)
    labels = class_labels(args.quality_n, config.num_classes)
    seeds = [int(s) for s in args.quality_seeds.split(",")]
    out = {"n": args.quality_n, "seeds": seeds, "floor": scorer.floor(args.quality_n), "settings": {}}
    for name, extra in [("plain", {})] + settings:
        per_seed = []
        for seed in seeds:
            tokens = sample_tokens(model, labels, batch_size=args.batch, seed=seed, **sampling, **extra)
            per_seed.append(scorer.score(tokens, labels))
        keys = ("fid", "kid_mean", "structure", "precision", "recall")
        out["settings"][name] = {k: spread([m[k] for m in per_seed]) for k in keys if k in per_seed[0]}
        out["settings"][name]["structure_per_class"] = {
            c: float(sum(m["structure_per_class"][c] for m in per_seed) / len(per_seed))
            for c in per_seed[0].get("structure_per_class", {})}
        q = out["settings"][name]
        print(f"quality {name:>18}: FID {q['fid']['mean']:.3f} +- {q['fid']['std']:.3f}, structure "
              f"{q['structure']['mean']:.3f} +- {q['structure']['std']:.3f} ({len(seeds)} seeds x {args.quality_n})")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--ckpt", default=None, help="a mirai sampling/training checkpoint (model.pt / last.pt)")
    p.add_argument("--model", default="micro", help="preset for a random-weight model (no --ckpt)")
    p.add_argument("--grid", type=int, default=8)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--output-std", type=float, default=0.02, help="random model: output layer init std")
    p.add_argument("--windows", default="4,8,16,32")
    p.add_argument("--inits", default="prior,random")
    p.add_argument("--images", type=int, default=32, help="images (rows) per setting, in batches of --batch")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-time", action="store_true", help="skip the warm-up and wall-time measurement")
    p.add_argument("--quality-n", type=int, default=0, help="also score N plain and N speculative samples per seed "
                   "(FID / KID / structure on the built-in classifier, models.evaluate.Scorer); 0 = off")
    p.add_argument("--quality-seeds", default="0,1,2")
    p.add_argument("--quality-settings", default="16:prior", help="window:init pairs scored beside plain")
    p.add_argument("--data", default="shapes", help="--quality-n: the data the model was trained on")
    p.add_argument("--data-seed", type=int, default=0, help="--quality-n: the training run's --seed")
    p.add_argument("--cache-dir", default="runs/eval", help="--quality-n: classifier and reference features")
    args = p.parse_args(argv)
    device = setup_from_args(args)

    from models.sampling.generate import generate
    from models.sampling.speculative import speculative_generate

    model = build_model(args, device)
    config = model.config
    n = config.block_size
    sampling = dict(cfg_scale=args.cfg_scale, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    batches = [torch.arange(i, min(i + args.batch, args.images)) % config.num_classes
               for i in range(0, args.images, args.batch)]

    def plain(labels, seed):
        return generate(model, labels.to(device), generator=torch.Generator().manual_seed(seed), **sampling)

    if not args.no_time:
        plain(batches[0], 0)  # warm-up
    times = [timed(lambda: plain(b, args.seed + i), device)[1:] for i, b in enumerate(batches)]
    wall, cpu = sum(t[0] for t in times), sum(t[1] for t in times)
    labels_all = torch.cat(batches)
    first = batches[0].to(device)
    entropy = entropy_nats(model, first, plain(batches[0], args.seed), args.cfg_scale, args.temperature)
    print(f"mean entropy of the sampling distributions along plain samples: {entropy:.3f} nats "
          f"(uniform: {torch.log(torch.tensor(float(config.vocab_size))):.3f})")
    results = [dict(name="plain", window=1, init=None, calls_mean=float(n), calls_min=n, calls_max=n,
                    calls_p50=float(n), calls_hist={str(n): args.images}, batch_calls_mean=float(n),
                    wall_s=None if args.no_time else wall, cpu_s=None if args.no_time else cpu,
                    ratio_calls=1.0, ratio_wall=1.0, ratio_cpu=1.0)]
    print(f"model {config.dim}d x{config.n_layer} vocab {config.vocab_size} grid {config.grid}: {n} tokens/image, "
          f"{args.images} images, {sampling}")
    print(f"{'setting':>22} {'calls/img':>9} {'p50':>5} {'min':>4} {'max':>4} {'x fewer':>8} {'wall s':>8} "
          f"{'x wall':>7} {'cpu s':>7} {'x cpu':>6}")
    print(f"{'plain':>22} {n:9.1f} {n:5d} {n:4d} {n:4d} {1.0:8.2f} {wall if not args.no_time else float('nan'):8.2f} "
          f"{1.0:7.2f} {cpu if not args.no_time else float('nan'):7.2f} {1.0:6.2f}")
    for window in [int(w) for w in args.windows.split(",")]:
        for init in args.inits.split(","):
            def spec(labels, seed):
                return speculative_generate(model, labels.to(device), n, window=window, init=init,
                                            generator=torch.Generator().manual_seed(seed), return_stats=True,
                                            **sampling)
            if not args.no_time:
                spec(batches[0], 0)
            calls, steps, wall_s, cpu_s = [], [], 0.0, 0.0
            for i, b in enumerate(batches):
                (_, stats), t, c = timed(lambda: spec(b, args.seed + i), device)
                calls.append(stats["calls"].cpu().long() + 1)  # + the prefill
                steps.append(stats["steps"] + 1)
                wall_s += t
                cpu_s += c
            calls = torch.cat(calls)
            hist = torch.bincount(calls)
            per_class = {int(c): float(calls[labels_all == c].float().mean()) for c in labels_all.unique().tolist()}
            row = dict(name=f"jacobi-w{window}-{init}", window=window, init=init,
                       calls_mean=float(calls.float().mean()), calls_min=int(calls.min()), calls_max=int(calls.max()),
                       calls_p50=float(calls.float().median()),
                       calls_p10=float(calls.float().quantile(0.1)), calls_p90=float(calls.float().quantile(0.9)),
                       calls_hist={str(k): int(v) for k, v in enumerate(hist.tolist()) if v},
                       calls_per_class=per_class,
                       batch_calls_mean=sum(steps) / len(steps), tokens_per_call=n / float(calls.float().mean()),
                       wall_s=None if args.no_time else wall_s, cpu_s=None if args.no_time else cpu_s,
                       ratio_calls=n / float(calls.float().mean()),
                       ratio_wall=None if args.no_time else wall / wall_s,
                       ratio_cpu=None if args.no_time else cpu / cpu_s)
            results.append(row)
            print(f"{row['name']:>22} {row['calls_mean']:9.1f} {row['calls_p50']:5.0f} {row['calls_min']:4d} "
                  f"{row['calls_max']:4d} {row['ratio_calls']:8.2f} "
                  f"{wall_s if not args.no_time else float('nan'):8.2f} "
                  f"{row['ratio_wall'] if row['ratio_wall'] is not None else float('nan'):7.2f} "
                  f"{cpu_s if not args.no_time else float('nan'):7.2f} "
                  f"{row['ratio_cpu'] if row['ratio_cpu'] is not None else float('nan'):6.2f}")
    extra = {}
    if args.quality_n:
        settings = []
        for item in args.quality_settings.split(","):
            w, init = item.split(":")
            settings.append((f"jacobi-w{w}-{init}", dict(speculative="jacobi", window=int(w), draft_init=init)))
        extra["quality"] = quality(model, settings, args, device, sampling)
    write_json(args.json, "spec_bench", args, device, results,
               notes={**extra, "entropy_nats": entropy,
                      "entropy": "mean entropy of the sampling distributions along plain samples (teacher-forced)","model": dict(dim=config.dim, n_layer=config.n_layer, vocab=config.vocab_size,
                                    grid=list(config.grid), ckpt=args.ckpt),
                      "calls": "per image, prefill included; plain = H*W",
                      "ratio_calls": "plain calls / speculative calls (mean per image)",
                      "ratio_wall": "plain wall / speculative wall (same images, one process)",
                      "ratio_cpu": "plain / speculative process CPU seconds (all threads)",
                      "calls_per_class": "mean calls per image of each class label"})
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
