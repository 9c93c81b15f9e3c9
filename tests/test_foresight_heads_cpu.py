"""The C++ CPU path of ``ForesightHeads`` (``mirai::foresight_heads``, csrc/foresight_heads.cpp), against the paper's
eager heads in fp64 by FlashAttention's rule: both vector paths (AVX-512 and the portable loops), 1 and 2 threads
(their task splits differ), the SiLU's saturated range, every CPU dtype, partial gradients, the kept workspace
(shared, contended, off), bad inputs and ``opcheck``."""

import os
import re
import subprocess
import sys
import threading

import pytest
import torch
from torch.library import opcheck

from mirai_kernels import backend as B
from mirai_kernels.modules import ForesightHeads
from mirai_kernels.ops import face_op
from mirai_kernels.ops import foresight as fops
from mirai_kernels.reference import foresight as ref

from .tolerances import assert_close_fa

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif("cpp" not in B.available_faces(fops.HEADS_OP.name, CPU),
                                reason="the C++ extension is not built")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_case(*, batch=2, grid=(8, 8), d=48, hidden=72, z=40, depth=3, seed=0, std=0.3, dtype=torch.float32,
              offsets=None, prefix=1):
    """Mirai-E heads (offsets 0, right, below; or ``offsets``, λ 2 each) with weights large enough that every
    layer's SiLU sees both signs and its curved range; hidden 72 and z 40 are not multiples of 16 (the vector
    loops' tails)."""
    torch.manual_seed(seed)
    if offsets is None:
        module = ForesightHeads.mirai_e(d, grid=grid, z_dim=z, hidden=hidden, depth=depth, prefix=prefix,
                                        backend="cpp")
    else:
        module = ForesightHeads(d, z, offsets, grid=grid, prefix=prefix, head_weights=[2.0] * len(offsets),
                                hidden=hidden, depth=depth, backend="cpp")
    for p in module.parameters():
        torch.nn.init.normal_(p, std=std)
    n = prefix + grid[0] * grid[1] - 1
    h = torch.randn(batch, n, d)
    targets = torch.randn(batch, n, z)
    module = module.to(dtype)
    return module, h.to(dtype), targets.to(dtype)


def fast_grads(module, h, targets):
    """per_head and the gradients of total (h first, then the parameters by name) from the C++ path."""
    h = h.detach().requires_grad_()
    total, per_head = module(h, targets)
    assert type(per_head.grad_fn).__name__ == "_HeadsGradsInForwardBackward", "the C++ heads path did not run"
    names = [n for n, _ in module.named_parameters()]
    grads = torch.autograd.grad(total, [h] + [p for _, p in module.named_parameters()])
    return per_head.detach(), dict(zip(["h"] + names, grads))


def paper_grads(module, h, targets, dtype):
    """The paper's K separate eager MLPs at ``dtype`` (weights copied from the module): per_head and the gradients
    of total = sum_k head_weights[k] * per_head[k], stacked into the module's parameter layout."""
    mlps = [mlp.to(dtype) for mlp in module.head_mlps()]
    hd = h.detach().to(dtype).requires_grad_()
    width = module.grid[1]
    raster = [o if isinstance(o, int) else o[0] * width + o[1] for o in module.offsets]
    _, per_head = ref.paper_heads_loss([mlp(hd) for mlp in mlps], targets.to(dtype), raster, module.prefix)
    total = (torch.tensor(module.head_weights, dtype=per_head.dtype) * per_head).sum()
    layers = [[m for m in mlp if isinstance(m, torch.nn.Linear)] for mlp in mlps]
    leaves = [hd] + [p for ls in layers for lin in ls for p in (lin.weight, lin.bias)]
    got = iter(torch.autograd.grad(total, leaves))
    g_h = next(got)
    per_lin = [[(next(got), next(got)) for _ in ls] for ls in layers]  # [k][layer] -> (grad_w, grad_b)
    stack = lambda layer, which: torch.stack([per_lin[k][layer][which] for k in range(len(mlps))])  # noqa: E731
    out = {"h": g_h, "weight_in": stack(0, 0).flatten(0, 1), "bias_in": stack(0, 1).flatten(),
           "weight_out": stack(-1, 0), "bias_out": stack(-1, 1)}
    for i in range(module.depth - 2):
        out[f"weights_mid.{i}"], out[f"biases_mid.{i}"] = stack(1 + i, 0), stack(1 + i, 1)
    return per_head.detach(), out


def check_against_paper(module, h, targets, per_head, grads):
    """The FlashAttention rule: error vs fp64 <= 2x (grads 3x) the paper code's own error at the same dtype. Each
    tensor is divided by its reference's largest magnitude first: the gradients of a mean over B * pairs are
    ~1e-3, where the rule's absolute floor (1e-5 in fp32) would hide errors of 1e-2 relative."""
    dtype = h.dtype
    ph_ref, g_ref = paper_grads(module, h, targets, torch.float64)
    ph_pt, g_pt = paper_grads(module, h, targets, dtype)

    def scaled(t, ref_t):
        scale = ref_t.abs().max().item() or 1.0
        return (t.double() / scale).to(t.dtype)

    # Measured here: this path's normalised fp32 errors are 1-1.3x the paper code's (~3e-7); a floor of 1e-6 still
    # absorbs a zero baseline error and catches a 1e-4 relative error in one SiLU derivative.
    floor = 1e-6 if dtype == torch.float32 else None
    assert_close_fa(scaled(per_head, ph_ref), scaled(ph_ref, ph_ref).to(per_head.dtype), scaled(ph_pt, ph_ref),
                    floor=floor, name="per_head")
    for name, g in grads.items():
        r = g_ref[name]
        assert_close_fa(scaled(g, r), scaled(r, r).to(dtype), scaled(g_pt[name], r), factor=3.0, floor=floor,
                        name=f"grad {name}")


def with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("depth", [2, 3, 4])
@pytest.mark.parametrize("threads", [1, 2])
def test_fp32_matches_paper_heads(depth, threads):
    module, h, targets = make_case(depth=depth, seed=depth)
    per_head, grads = with_threads(threads, lambda: fast_grads(module, h, targets))
    check_against_paper(module, h, targets, per_head, grads)


def test_bench_shape_fp32_matches_paper_heads_at_1_and_2_threads():
    # foresight_bench.py's defaults (B 2, N 256, d 256, hidden 512, Z 256, K 3): 512 rows, 2 row blocks per head on 2
    # threads; the N(0, 0.02) init of the real module.
    module, h, targets = make_case(grid=(16, 16), d=256, hidden=512, z=256, std=0.02, seed=7)
    one = with_threads(1, lambda: fast_grads(module, h, targets))
    two = with_threads(2, lambda: fast_grads(module, h, targets))
    for per_head, grads in (one, two):
        check_against_paper(module, h, targets, per_head, grads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n, batch, grid, prefix, offsets", [
    (1, 64, (1, 1), 1, [0]),                       # S = 1: only the prefix position, paired with itself
    (17, 4, (4, 4), 2, [0, 1, (1, 0)]),
    (257, 2, (16, 16), 2, [0, 1, (1, 0)]),         # 514 rows: two uneven row blocks per head on 2 threads
    (577, 1, (24, 24), 2, [0, (1, 1)]),            # 577 rows: blocks of 289 and 288
])
def test_odd_sequence_lengths_match_paper_heads(n, batch, grid, prefix, offsets, threads):
    module, h, targets = make_case(batch=batch, grid=grid, prefix=prefix, offsets=offsets, d=16, hidden=24, z=8,
                                   seed=n)
    assert h.shape[1] == n
    per_head, grads = with_threads(threads, lambda: fast_grads(module, h, targets))
    check_against_paper(module, h, targets, per_head, grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_other_dtypes_match_paper_heads(dtype):
    module, h, targets = make_case(dtype=dtype, seed=3)
    per_head, grads = fast_grads(module, h, targets)
    assert per_head.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(g.dtype == dtype for g in grads.values())
    check_against_paper(module, h, targets, per_head, grads)


def test_saturated_silu_range_stays_exact():
    # Pre-activations far past the exp clamp (|a| >> 88) and at 0: silu -> x or -> 0, silu' -> 1 or -> 0.
    module, h, targets = make_case(seed=5, std=0.3)
    with torch.no_grad():
        module.bias_in[:20] = 300.0
        module.bias_in[20:40] = -300.0
        module.bias_in[40:44] = 0.0
        module.weight_in[40:44] = 0.0
    per_head, grads = fast_grads(module, h, targets)
    assert all(torch.isfinite(g).all() for g in grads.values())
    check_against_paper(module, h, targets, per_head, grads)


@pytest.mark.parametrize("frozen", [["weight_in", "bias_in"], ["weight_out", "bias_out", "weights_mid.0"],
                                    ["weight_in", "bias_in", "weights_mid.0", "biases_mid.0"], ["h"]])
def test_partial_gradients(frozen):
    # Frozen parameters get no gradient; the chain stops where nothing below wants one; the rest are unchanged.
    module, h, targets = make_case(seed=11)
    _, full = fast_grads(module, h, targets)
    for name, p in module.named_parameters():
        p.requires_grad_(name not in frozen)
    hh = h.detach().requires_grad_("h" not in frozen)
    total, per_head = module(hh, targets)
    assert type(per_head.grad_fn).__name__ == "_HeadsGradsInForwardBackward"
    leaves = ([hh] if "h" not in frozen else []) + [p for n, p in module.named_parameters() if n not in frozen]
    names = (["h"] if "h" not in frozen else []) + [n for n, _ in module.named_parameters() if n not in frozen]
    for name, g in zip(names, torch.autograd.grad(total, leaves)):
        torch.testing.assert_close(g, full[name], rtol=0, atol=0)


def test_op_skips_what_grad_mask_leaves_out():
    module, h, targets = make_case(seed=2)
    tpos = fops.pairing_table(h.shape[1], module.grid, module.offsets, prefix=module.prefix)
    ws = [module.weight_in, module.weights_mid[0], module.weight_out]
    bs = [module.bias_in, module.biases_mid[0], module.bias_out]
    ws, bs = [w.detach() for w in ws], [b.detach() for b in bs]
    op = face_op("foresight_heads", "cpp")
    full = op(h, targets, tpos, ws, bs, [1] * 7, [0.1, 0.2, 0.3])
    only_out = op(h, targets, tpos, ws, bs, [0, 0, 0, 0, 0, 1, 1], [0.1, 0.2, 0.3])
    torch.testing.assert_close(only_out[0], full[0], rtol=0, atol=0)
    assert only_out[1].numel() == 0 and [t.numel() for t in only_out[2][:2] + only_out[3][:2]] == [0] * 4
    torch.testing.assert_close(only_out[2][2], full[2][2], rtol=0, atol=0)
    torch.testing.assert_close(only_out[3][2], full[3][2], rtol=0, atol=0)


def test_opcheck_and_bad_inputs():
    module, h, targets = make_case(batch=1, grid=(4, 4), d=16, hidden=24, z=8, seed=4)
    tpos = fops.pairing_table(h.shape[1], module.grid, module.offsets, prefix=module.prefix)
    ws = [module.weight_in.detach(), module.weights_mid[0].detach(), module.weight_out.detach()]
    bs = [module.bias_in.detach(), module.biases_mid[0].detach(), module.bias_out.detach()]
    op = face_op("foresight_heads", "cpp")
    opcheck(op, (h, targets, tpos, ws, bs, [1] * 7, [0.5, 0.25, 1.0]))
    opcheck(op, (h, targets, tpos, ws, bs, [0, 1, 0, 0, 1, 1, 0], [1.0, 1.0, 1.0]))
    with pytest.raises(RuntimeError, match="grad_mask needs 1 \\+ 2 \\* depth = 7 flags"):
        op(h, targets, tpos, ws, bs, [1] * 6, [1.0] * 3)
    with pytest.raises(RuntimeError, match="each middle weight must be"):
        op(h, targets, tpos, [ws[0], ws[1][:, :4], ws[2]], bs, [1] * 7, [1.0] * 3)
    with pytest.raises(RuntimeError, match="tpos values must lie in"):
        op(h, targets, tpos + 100, ws, bs, [1] * 7, [1.0] * 3)
    with pytest.raises(RuntimeError, match="of h's dtype"):
        op(h, targets, tpos, [ws[0].double(), ws[1], ws[2]], bs, [1] * 7, [1.0] * 3)


def test_concurrent_calls_agree_with_a_lone_call():
    # Two threads at once: one holds the kept workspace, the other allocates its own; both give the lone result.
    module, h, targets = make_case(seed=9)
    lone = fast_grads(module, h, targets)
    results, errors = [None] * 4, []

    def run(i):
        try:
            results[i] = fast_grads(module, h, targets)
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for per_head, grads in results:
        torch.testing.assert_close(per_head, lone[0], rtol=0, atol=0)
        for name, g in grads.items():
            torch.testing.assert_close(g, lone[1][name], rtol=0, atol=0)


# The portable loops (MIRAI_CPU_NO_AVX512=1, read once per process) and no kept workspace (MIRAI_CPU_WORKSPACE_MB=0)
# run in a child process: it saves its results, the parent checks them against the paper heads.
_CHILD = r"""
import sys, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(int(sys.argv[3]))  # the parent's: the task split (and so the rounding) depends on it
from tests.test_foresight_heads_cpu import make_case, fast_grads
out = {}
for depth in (2, 3):
    module, h, targets = make_case(depth=depth, seed=20 + depth)
    out[depth] = fast_grads(module, h, targets)
torch.save(out, sys.argv[1])
"""


@pytest.mark.parametrize("env", [{"MIRAI_CPU_NO_AVX512": "1"}, {"MIRAI_CPU_WORKSPACE_MB": "0"}])
def test_portable_loops_and_no_workspace_in_a_child_process(tmp_path, env):
    path = tmp_path / "child.pt"
    child_env = {**os.environ, **env, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(path), ROOT, str(torch.get_num_threads())],
                          capture_output=True, text=True,
                          timeout=300, env=child_env)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = torch.load(path, weights_only=True)
    for depth, (per_head, grads) in saved.items():
        module, h, targets = make_case(depth=depth, seed=20 + depth)
        check_against_paper(module, h, targets, per_head, grads)
        if "MIRAI_CPU_WORKSPACE_MB" in env:  # same arithmetic as this process: bit for bit
            here = fast_grads(module, h, targets)
            torch.testing.assert_close(per_head, here[0], rtol=0, atol=0)
            for name, g in grads.items():
                torch.testing.assert_close(g, here[1][name], rtol=0, atol=0)


@pytest.mark.parametrize("value", ["lots", "-1", "12MB"])
def test_a_bad_workspace_size_is_refused_by_name(value):
    env = {**os.environ, "MIRAI_CPU_WORKSPACE_MB": value,
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _CHILD, os.devnull, ROOT, "1"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode != 0
    assert f"MIRAI_CPU_WORKSPACE_MB must be a whole number of MiB >= 0 (0 keeps no workspace), got '{value}'" \
        in done.stderr


def test_eps_agrees_with_the_reference():
    with open(os.path.join(ROOT, "csrc", "foresight.h")) as f:
        text = f.read()
    match = re.search(r"constexpr double kForesightEps = ([0-9.eE+-]+);", text)
    assert match and float(match.group(1)) == ref.EPS
