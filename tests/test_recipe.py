"""The paper's recipe, pinned against the official Mirai training scripts' behaviour, each rule written from its
definition (MIRAI_SPEC.md, "The official recipe"): λ schedules, projector width, fp32 targets, weight-decay groups,
epoch-based switches, DINOv2 preparation and the ``--recipe paper`` presets."""

import json

import pytest
import torch

from models import foresight as fs
from models.gpt import GPT, build_gpt, config_from_preset

OFFICIAL_STEPS_PER_EPOCH = 1_281_167 // 256  # ImageNet train at global batch 256, drop_last: 5004


def tiny_gpt(dropout=0.0, grid=(4, 4), **kw):
    model = build_gpt("tiny", grid=grid, vocab_size=8, num_classes=10, token_dropout_p=dropout,
                      resid_dropout_p=dropout, ffn_dropout_p=dropout, class_dropout_prob=0.0, **kw)
    with torch.no_grad():  # LlamaGen zero-inits the output layer: perturb so every state moves
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def token_encoder(model):
    from models.encoder import TokenEncoder

    return TokenEncoder(8, model.config.block_size, dim=32, depth=1, heads=2)


def make(name, model, **kw):
    ema = fs.EMA(model, 0.9)
    encoder = token_encoder(model) if name == "mirai-i" else None
    return fs.build_objective(name, model, ema=ema, head_width=32, encoder=encoder, **kw)


def batch(model, b=3):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 8, (b, model.config.block_size), generator=g)
    return tokens[:, :-1], torch.randint(0, 10, (b,), generator=g), tokens


# ---------------------------------------------------------------------------------------------------------
# 1. λ multiplier: Mirai-E halves from the halving step on; Mirai-I never does (1.0 in both branches)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [("mirai-e", [1.0, 1.0, 0.5, 0.5]), ("mirai-i", [1.0, 1.0, 1.0, 1.0])])
def test_only_mirai_e_halves_lambda(name, expected):
    model = tiny_gpt()
    objective = make(name, model, layer=2, warmup_steps=0, halve_at=2)
    idx, labels, tokens = batch(model)
    scales = [objective.loss(model, idx, labels, tokens, step=s)[1]["foresight_scale"] for s in range(4)]
    assert scales == expected


# ---------------------------------------------------------------------------------------------------------
# 2. Projector width: 2048 for GPT-B and up (Linear d->2048, SiLU, 2048->2048, SiLU, 2048->z), 4d below
# ---------------------------------------------------------------------------------------------------------


def official_head_params(d, z, k, width=2048):
    return k * ((d * width + width) + (width * width + width) + (width * z + z))


@pytest.mark.parametrize("preset,width", [("micro", 512), ("tiny", 1024), ("small", 1536), ("B", 2048),
                                          ("L", 2048), ("XL", 2048)])
def test_default_head_width(preset, width):
    assert fs.default_head_width(config_from_preset(preset).dim) == width


def test_gpt_b_mirai_e_head_parameters_are_the_papers():
    with torch.device("meta"):
        model = GPT(config_from_preset("B"))
        objective = fs.build_objective("mirai-e", model, ema=fs.EMA(model, 0.9999), warmup_steps=0)
    n = sum(p.numel() for p in objective.heads.parameters())
    assert n == official_head_params(768, 768, 3) == 22_034_688  # 22.0 M (4d = 3072 would give 42.5 M)
    assert objective.heads.hidden == 2048 and objective.heads.depth == 3 and objective.layer == 8


# ---------------------------------------------------------------------------------------------------------
# 4. Targets in fp32 outside the student's autocast (forced on CPU: train.py only autocasts on CUDA)
# ---------------------------------------------------------------------------------------------------------


def captured_targets(objective, model, idx, labels, tokens, autocast):
    seen = []
    hook = objective.heads.register_forward_pre_hook(lambda mod, args: seen.append(args[1].detach().clone()))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            objective.loss(model, idx, labels, tokens, step=0)
    finally:
        hook.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["mirai-e", "mirai-i"])
def test_targets_are_fp32_under_student_autocast(name):
    model = tiny_gpt()
    objective = make(name, model, layer=2, warmup_steps=0, halve_at=None)
    idx, labels, tokens = batch(model)
    exact = captured_targets(objective, model, idx, labels, tokens, autocast=False)
    under = captured_targets(objective, model, idx, labels, tokens, autocast=True)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, exact, rtol=1e-6, atol=1e-6)
    # the speed option keeps the student's autocast for the targets: they move (bf16 rounding)
    objective.teacher_autocast = True
    fast = captured_targets(objective, model, idx, labels, tokens, autocast=True)
    assert (fast - exact).abs().max() > 1e-4
