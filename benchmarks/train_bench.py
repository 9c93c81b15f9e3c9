"""Training-step time of every objective side by side, each beside its FLOP floor.

    python benchmarks/train_bench.py                                  # CPU defaults: tiny GPT, 8x8 grid, batch 16
    python benchmarks/train_bench.py --model B --grid 16 --batch 32 --head-width 2048 --json out.json   # GPU

One call = one full step (forward, objective, backward, AdamW, EMA refresh) through ``models.train.TrainStep``.
Baseline: ``none`` (next-token loss only). The FLOP floor of an objective is its step's matmul FLOPs over the
baseline's: training a GEMM costs 6 FLOPs per weight per token (forward 2 + backward 4), a no-grad teacher 2, and
attention ``12 * S * d`` per token and layer for training (``4 * S * d`` forward, x0.5 causal; the shared
bidirectional pass costs one full attention instead of a causal one). The paper's GPT-B figures: each 2048-wide
head is ~7% of a step, the 8-block no-grad teacher ~19%, so Mirai-E >= 1.41x.
"""

from __future__ import annotations

import argparse

import torch

from common import Case, add_common_args, run_cases, setup_from_args, write_json  # noqa: E402  (sets sys.path)

from models.nets.encoder import TokenEncoder  # noqa: E402
from models.nets.gpt import GPT, config_from_preset  # noqa: E402
from models.objectives.foresight import EMA, build_objective, default_head_width  # noqa: E402
from models.train import TrainStep, param_groups  # noqa: E402

OBJECTIVES = ("none", "mirai-e", "mirai-i", "mirai-s:teacher", "mirai-s:self")


def block_flops_per_token(config, seqlen: int, attention: str) -> float:
    """Forward matmul FLOPs per token of one block; attention "causal", "full" or "none" (projections only)."""
    d = config.dim
    ffn_hidden = config_ffn_hidden(config)
    weights = d * (d + 2 * config.n_head * config.head_dim) + d * d + 3 * d * ffn_hidden
    attn = {"causal": 2 * seqlen * d, "full": 4 * seqlen * d, "none": 0}[attention]
    return 2 * weights + attn


def config_ffn_hidden(config) -> int:
    hidden = int(2 * (4 * config.dim) / 3)
    return hidden + (-hidden) % config.multiple_of


def step_flops(config, batch: int, objective: str, layer: int, head_width: int, z_dim: int) -> float:
    seqlen = config.cls_token_num + config.block_size - 1
    tokens = batch * seqlen
    causal_block = block_flops_per_token(config, seqlen, "causal")
    base = 3 * tokens * (config.n_layer * causal_block + 2 * config.dim * config.vocab_size)
    heads = {"none": 0, "mirai-e": 3, "mirai-i": 1, "mirai-s:teacher": 1, "mirai-s:self": 1}[objective]
    head_params = config.dim * head_width + head_width * head_width + head_width * z_dim
    extra = 3 * tokens * 2 * head_params * heads
    if objective == "mirai-e":
        extra += tokens * (layer * causal_block)  # no-grad teacher, blocks 1..l
    elif objective == "mirai-s:teacher":
        # no-grad teacher to block l, whose attention is the shared pass (full instead of causal) plus a second
        # wo + FFN for the bidirectional branch
        extra += tokens * ((layer - 1) * causal_block + block_flops_per_token(config, seqlen, "full")
                           + 2 * (config.dim * config.dim + 3 * config.dim * config_ffn_hidden(config)))
    elif objective == "mirai-s:self":
        # the student's block l: full instead of causal attention, and the no-grad bidirectional branch's wo + FFN
        extra += 3 * tokens * 2 * seqlen * config.dim + tokens * 2 * (
            config.dim * config.dim + 3 * config.dim * config_ffn_hidden(config))
    return base + extra


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--model", default=None, help="GPT preset (default: B on GPU, tiny on CPU)")
    parser.add_argument("--grid", type=int, default=None, help="token grid side (default: 16 GPU, 8 CPU)")
    parser.add_argument("--batch", type=int, default=None, help="default: 32 GPU, 16 CPU")
    parser.add_argument("--vocab", type=int, default=None, help="default: 16384 GPU, 8 CPU (palette)")
    parser.add_argument("--head-width", type=int, default=None, help="foresight head width (default: 2048 for dim >= 512, else 4 x dim)")
    parser.add_argument("--layer", type=int, default=None, help="foresight block l (default 2/3 of the depth)")
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    args = parser.parse_args(argv)
    device = setup_from_args(args)
    on_gpu = device.type == "cuda"
    config = config_from_preset(args.model or ("B" if on_gpu else "tiny"), grid=args.grid or (16 if on_gpu else 8),
                                vocab_size=args.vocab or (16384 if on_gpu else 8), num_classes=1000 if on_gpu else 10)
    batch = args.batch or (32 if on_gpu else 16)
    layer = args.layer or max(1, round(2 * config.n_layer / 3))
    head_width = args.head_width or default_head_width(config.dim)
    z_dim = config.dim  # Mirai-E / -S targets are the GPT's own states; the built-in Mirai-I encoder is resized
    base_flops = step_flops(config, batch, "none", layer, head_width, z_dim)
    cases = [Case(name=f"train step {name}", params=dict(objective=name, model=args.model, grid=config.grid,
                                                          batch=batch, layer=layer, head_width=head_width,
                                                          flop_floor_ratio=step_flops(config, batch, name, layer,
                                                                                      head_width, z_dim) / base_flops),
                  flops=step_flops(config, batch, name, layer, head_width, z_dim))
             for name in args.objectives]

    tokens = torch.randint(0, config.vocab_size, (batch, config.block_size), device=device)
    labels = torch.randint(0, config.num_classes, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else torch.autocast("cpu", enabled=False)

    def make_step(case):
        name, _, source = case.params["objective"].partition(":")
        torch.manual_seed(0)
        model = GPT(config).to(device)
        ema = EMA(model, 0.999)
        encoder = TokenEncoder(config.vocab_size, config.block_size, dim=z_dim, depth=2).to(device)
        objective = build_objective(name, model, ema=ema, layer=layer, head_width=head_width,
                                    mirai_s_source=source or "teacher", encoder=encoder).to(device)
        optimizer = torch.optim.AdamW(param_groups([model, objective], 0.05), lr=1e-4, betas=(0.9, 0.95))
        step_module = TrainStep(model, objective)

        def step():
            with autocast:
                loss, _ = step_module(tokens[:, :-1], labels, tokens, 10**6)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            ema.update(model)

        return {"step": step}

    results = []
    for case in cases:
        row = run_cases([case], make_step, baseline="step", device=device, args=args)[0]
        results.append(row)
    base_ms = results[0]["providers"]["step"].get("ms") if args.objectives[0] == "none" else None
    print("\nobjective            ms/step   vs none   FLOP floor")
    for row in results:
        entry = row["providers"]["step"]
        if "ms" not in entry:
            continue
        ratio = entry["ms"] / base_ms if base_ms else float("nan")
        entry["time_ratio_vs_none"] = ratio
        print(f"{row['params']['objective']:<18} {entry['ms']:9.1f} {ratio:9.2f}x {row['params']['flop_floor_ratio']:9.2f}x")
    write_json(args.json, "train_bench", args, device, results, notes={
        "flop_floor_ratio": "matmul FLOPs of the objective's step / the 'none' step (see the module docstring)",
        "time_ratio_vs_none": "measured step time / the 'none' step time, same run",
    })
    return results


if __name__ == "__main__":
    main()
