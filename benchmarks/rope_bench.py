"""2D RoPE on q and k of a LlamaGen block: every backend of ``apply_rope_2d`` beside LlamaGen's eager formula.

    python benchmarks/rope_bench.py                       # CPU defaults: GPT-B heads, 16x16 and 24x24 grids
    python benchmarks/rope_bench.py --batch 32 --heads 16 --head-dim 64 --grids 16 --json out.json

Baseline: LlamaGen's ``apply_rotary_emb`` written eagerly (fp32 upcast, stack, flatten, cast back), applied to the
q slice of a fused qkv tensor. Bytes moved per call: x read + out written + table rows read.
"""

from __future__ import annotations

import argparse

import torch

from common import Case, add_common_args, run_cases, setup_from_args, write_json  # noqa: E402  (sets sys.path)

import mirai_kernels as mk  # noqa: E402
from mirai_kernels import backend as B  # noqa: E402


def llamagen_eager(x, table):
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    rows = table[: x.shape[1]].view(1, x.shape[1], 1, pairs.shape[3], 2)
    out = torch.stack(
        [pairs[..., 0] * rows[..., 0] - pairs[..., 1] * rows[..., 1],
         pairs[..., 1] * rows[..., 0] + pairs[..., 0] * rows[..., 1]],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 32 on GPU")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--grids", type=int, nargs="+", default=[16, 24], help="square grid sides")
    parser.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: fp32 CPU, bf16 GPU)")
    parser.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    args = parser.parse_args(argv)
    device = setup_from_args(args)
    batch = args.batch or (32 if device.type == "cuda" else 4)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))

    cases = []
    for side in args.grids:
        seqlen = side * side  # training: class token + all but the last image token
        elems = batch * seqlen * args.heads * args.head_dim
        cases.append(Case(
            name=f"rope_2d grid {side}x{side} S={seqlen}",
            params=dict(batch=batch, seqlen=seqlen, heads=args.heads, head_dim=args.head_dim, dtype=str(dtype),
                        backward=args.backward),
            bytes=2 * elems * dtype.itemsize + seqlen * args.head_dim * 4,
        ))

    def make_providers(case):
        p = case.params
        table = mk.rope_2d_table(int(p["seqlen"] ** 0.5), p["head_dim"], device=device)
        qkv = torch.randn(p["batch"], p["seqlen"], 3, p["heads"], p["head_dim"], dtype=dtype, device=device)
        x = qkv[:, :, 0].requires_grad_(args.backward)
        grad = torch.randn(x.shape, dtype=dtype, device=device)

        def wrap(fn):
            if not args.backward:
                return lambda: fn(x, table)
            return lambda: torch.autograd.grad(fn(x, table), x, grad)

        providers = {"llamagen_eager": wrap(llamagen_eager)}
        for face in B.op_faces("apply_rope_2d"):
            reason = B.face_unavailable_reason("apply_rope_2d", face, device)
            if face == "triton" and B.triton_interpreted():
                reason = "interpreted Triton is a correctness tool, not timed"
            if reason is None and face == "triton" and dtype == torch.float64:
                reason = "no fp64 Triton backend"
            providers[f"mirai_{face}"] = (None, reason) if reason else wrap(
                lambda t, tab, face=face: mk.apply_rope_2d(t, tab, backend=face))
        return providers

    results = run_cases(cases, make_providers, baseline="llamagen_eager", device=device, args=args)
    write_json(args.json, "rope_bench", args, device, results,
               notes={"bytes": "x read + out written (+ table rows), per call; forward only unless --backward"})
    return results


if __name__ == "__main__":
    main()
