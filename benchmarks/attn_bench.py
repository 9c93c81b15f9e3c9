"""Dual (causal + bidirectional) attention: every backend of ``dual_attention`` beside two SDPA calls.

    python benchmarks/attn_bench.py                        # CPU defaults: GPT-B heads, S = 256 and 576, batch 2, fp32
    python benchmarks/attn_bench.py --batch 32 --heads 16 --seqlens 256 576 --json out.json   # GPU: bf16

Providers for "both outputs" (baseline ``sdpa_x2``: ``F.scaled_dot_product_attention`` causal + full, LlamaGen's
BHSD views of one fused qkv): ``mirai_<backend>`` (one call, both outputs), ``flex_x2`` (FlexAttention, compiled, two
block masks; forward only on CPU, where its backward is not implemented), ``naive_eager`` (masked softmax
attention written out, twice). A second table compares the causal-only mode (``outputs="causal"``) with
``sdpa_causal``.

Modes: ``fwd`` (inputs without grad), ``bwd`` (backward of a recorded forward, upstream gradients for both
outputs), ``fwdbwd``. FLOPs (the useful work, the same for every provider of a case, so TFLOP/s compare like the
times): one attention forward is ``4 B S^2 H D`` with a causal one counted at half, so both outputs are
``1.5 x 4 B S^2 H D`` forward, ``x 2.5`` for backward, ``x 3.5`` for fwd+bwd. Memory: peak allocated bytes over
the call on GPU; on CPU the bytes autograd saves for backward during the forward (``saved_bytes``).

CPU: every case runs at each of ``--thread-counts`` (default ``1`` and all cores) and records process-CPU time per
call (``cpu_ms``, median of ``--cpu-reps`` calls, beside their median wall time ``wall_ms``) next to the harness's
wall-clock median (``ms``): on a loaded machine the wall ratio can be faked or hidden by other processes, the CPU
ratio much less so (at N threads it is the summed CPU of all of them). Ratios of both go in the summary.

    python benchmarks/attn_bench.py --no-flex --no-naive --no-causal-table --seqlens 256 257 576 577 \
        --modes fwd fwdbwd --thread-counts 1 2 --json benchmarks/results/attn_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

from common import (Case, add_common_args, peak_memory_bytes, run_cases, saved_tensor_bytes,  # noqa: E402
                    setup_from_args, write_json)

import mirai_kernels as mk  # noqa: E402
from mirai_kernels import backend as B  # noqa: E402

OP = "dual_attention"
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def naive_eager(q, k, v, causal_only=False):
    """Both outputs written out in BHSD: scores, masked softmax, P @ V (what a model without the fused op does)."""
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    future = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool, device=q.device).triu(1)
    out_c = scores.masked_fill(future, float("-inf")).softmax(-1) @ v
    return (out_c,) if causal_only else (out_c, scores.softmax(-1) @ v)


class FlexPair:
    """FlexAttention with a causal and a full block mask, compiled once per sequence length."""

    def __init__(self, seqlen, device):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        self.causal = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, seqlen, seqlen, device=device)
        self.full = create_block_mask(lambda b, h, qi, kv: qi >= 0, None, None, seqlen, seqlen, device=device)
        self.fn = torch.compile(flex_attention, dynamic=False)

    def __call__(self, q, k, v):
        return self.fn(q, k, v, block_mask=self.causal), self.fn(q, k, v, block_mask=self.full)


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 32 on GPU")
    parser.add_argument("--heads", type=int, default=12, help="query heads (GPT-B 12, GPT-L 16)")
    parser.add_argument("--kv-heads", type=int, default=None, help="K/V heads (grouped attention), default = heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqlens", type=int, nargs="+", default=[256, 576],
                        help="LlamaGen training lengths: 256 (16x16 grid), 576 (24x24)")
    parser.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: fp32 CPU, bf16 GPU)")
    parser.add_argument("--modes", nargs="+", default=["fwd", "bwd", "fwdbwd"], choices=list(MODE_FLOP_FACTOR))
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes ~10 s/shape)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive eager provider")
    parser.add_argument("--no-causal-table", action="store_true", help="skip the causal-only comparison")
    parser.add_argument("--thread-counts", type=int, nargs="+", default=None,
                        help="CPU: run every case at each torch thread count (0 = all cores); default 1 and all, "
                             "or just --threads when given")
    parser.add_argument("--cpu-reps", type=int, default=15, help="CPU: calls timed one by one for cpu_ms / wall_ms")
    args = parser.parse_args(argv)
    device = setup_from_args(args)
    if device.type != "cpu":
        thread_counts = [None]
    elif args.thread_counts:
        thread_counts = [n or os.cpu_count() for n in args.thread_counts]
    elif args.threads:
        thread_counts = [args.threads]
    else:
        thread_counts = sorted({1, os.cpu_count() or 1})
    batch = args.batch or (32 if device.type == "cuda" else 2)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    heads, kv_heads, head_dim = args.heads, args.kv_heads or args.heads, args.head_dim

    def cases_for(kind, threads):
        out = []
        tag = f" thr={threads}" if threads else ""
        for seqlen in args.seqlens:
            base = 4.0 * batch * seqlen * seqlen * heads * head_dim
            for mode in args.modes:
                useful = (1.5 if kind == "both" else 0.5) * base * MODE_FLOP_FACTOR[mode]
                out.append(Case(name=f"{kind} S={seqlen} {mode}{tag}",
                                params=dict(kind=kind, batch=batch, seqlen=seqlen, heads=heads, kv_heads=kv_heads,
                                            head_dim=head_dim, dtype=str(dtype), mode=mode, threads=threads),
                                flops=useful))
        return out

    flex_cache = {}

    def make_providers(case):
        p = case.params
        mode, seqlen, causal_only = p["mode"], p["seqlen"], p["kind"] == "causal"
        qkv = torch.randn(batch, seqlen, heads + 2 * kv_heads, head_dim, dtype=dtype, device=device)
        q, k, v = (t.detach().requires_grad_(mode != "fwd") for t in
                   (qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], qkv[:, :, heads + kv_heads:]))
        grads = [torch.randn(batch, seqlen, heads, head_dim, dtype=dtype, device=device) for _ in range(2)]
        grads_bhsd = [g.transpose(1, 2) for g in grads]
        group = heads // kv_heads

        def bhsd():
            kk, vv = k.transpose(1, 2), v.transpose(1, 2)
            if group > 1:
                kk, vv = kk.repeat_interleave(group, 1), vv.repeat_interleave(group, 1)
            return q.transpose(1, 2), kk, vv

        def provider(forward, grads_):
            """A zero-argument callable timing ``mode`` of ``forward`` (which returns a tuple of outputs)."""
            if mode == "fwd":
                def run():
                    with torch.no_grad():
                        return forward()
                return run
            if mode == "fwdbwd":
                def run():
                    outs = forward()
                    return torch.autograd.grad(outs, (q, k, v), grads_[: len(outs)])
                return run
            outs = forward()  # bwd: one recorded forward, its backward timed
            return lambda: torch.autograd.grad(outs, (q, k, v), grads_[: len(outs)], retain_graph=True)

        providers = {}
        if causal_only:
            providers["sdpa_causal"] = provider(
                lambda: (F.scaled_dot_product_attention(*bhsd(), is_causal=True),), grads_bhsd)
        else:
            providers["sdpa_x2"] = provider(
                lambda: (F.scaled_dot_product_attention(*bhsd(), is_causal=True),
                         F.scaled_dot_product_attention(*bhsd())), grads_bhsd)
        outputs = "causal" if causal_only else "both"
        for face in B.op_faces(OP):
            if face == "reference":
                continue  # the same math as naive_eager
            reason = B.face_unavailable_reason(OP, face, device)
            if face == "triton" and B.triton_interpreted():
                reason = "interpreted Triton is a correctness tool, not timed"
            if reason:
                providers[f"mirai_{face}"] = (None, reason)
                continue
            providers[f"mirai_{face}"] = provider(
                lambda face=face: tuple(o for o in mk.dual_attention(q, k, v, outputs=outputs, backend=face)
                                        if o is not None), grads)
        if not causal_only and not args.no_flex:
            if device.type == "cpu" and mode != "fwd":
                providers["flex_x2"] = (None, "FlexAttention has no CPU backward")
            elif group > 1:
                providers["flex_x2"] = (None, "grouped K/V not wired for FlexAttention here")
            else:
                if seqlen not in flex_cache:
                    flex_cache[seqlen] = FlexPair(seqlen, device)
                flex = flex_cache[seqlen]
                providers["flex_x2"] = provider(lambda: flex(*bhsd()), grads_bhsd)
        if not args.no_naive:
            providers["naive_eager"] = provider(lambda: naive_eager(*bhsd(), causal_only), grads_bhsd)
        return providers

    def memory(case, name, fn):
        # GPU: peak bytes of the timed call; CPU: see saved_bytes_table (what the forward keeps for backward), and
        # the process-CPU time per call (this hook runs right after the harness timed fn).
        if device.type == "cuda":
            return {"peak_bytes": peak_memory_bytes(fn, device)}
        return cpu_and_wall_ms(fn, args.cpu_reps)

    results = []
    for threads in thread_counts:
        if threads:
            torch.set_num_threads(threads)
        results += run_cases(cases_for("both", threads), make_providers, baseline="sdpa_x2", device=device,
                             args=args, memory=memory)
        if not args.no_causal_table:
            results += run_cases(cases_for("causal", threads), make_providers, baseline="sdpa_causal",
                                 device=device, args=args, memory=memory)
    add_cpu_ratios(results)
    if device.type == "cpu":
        saved = saved_bytes_table(batch, heads, kv_heads, head_dim, args.seqlens, dtype, device)
        for seqlen, row in saved.items():
            print(f"\nsaved for backward, S={seqlen}: " + "  ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in row.items()))
        notes_saved = {str(k): v for k, v in saved.items()}
    else:
        notes_saved = {}
    summary = summarize(results)
    print("\nsummary (speedup vs baseline, > 1 is faster):")
    for line in summary:
        print("  " + line)
    write_json(args.json, "attn_bench", args, device, results, notes={
        "flops": "both outputs: 1.5 * 4*B*S^2*H*D forward (causal counted at half), x2.5 backward, x3.5 fwd+bwd; "
                 "causal only: 0.5 * 4*B*S^2*H*D with the same factors",
        "baselines": "sdpa_x2 = F.scaled_dot_product_attention causal + full; sdpa_causal for the causal-only table",
        "cpu_time": "CPU: ms = harness wall median (blocked_autorange); cpu_ms / wall_ms = medians of --cpu-reps "
                    "single calls (process CPU over all threads / wall); cpu_speedup_vs_baseline from cpu_ms",
        "thread_counts": thread_counts,
        "saved_bytes_cpu": notes_saved,
        "summary": summary,
    })
    return results


def saved_bytes_table(batch, heads, kv_heads, head_dim, seqlens, dtype, device):
    """Bytes autograd saves in the forward for backward, per provider (CPU memory figure)."""
    out = {}
    for seqlen in seqlens:
        qkv = torch.randn(batch, seqlen, heads + 2 * kv_heads, head_dim, dtype=dtype, device=device,
                          requires_grad=True)
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads:heads + kv_heads], qkv[:, :, heads + kv_heads:]
        group = heads // kv_heads
        kk, vv = (t.transpose(1, 2).repeat_interleave(group, 1) for t in (k, v))
        row = {"sdpa_x2": saved_tensor_bytes(lambda: (F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv,
                                                                                       is_causal=True),
                                                      F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv))),
               "naive_eager": saved_tensor_bytes(lambda: naive_eager(q.transpose(1, 2), kk, vv))}
        for face in ("cpp",):
            if B.face_unavailable_reason(OP, face, device) is None:
                row[f"mirai_{face}"] = saved_tensor_bytes(lambda face=face: mk.dual_attention(q, k, v, backend=face))
        out[seqlen] = row
    return out


def cpu_and_wall_ms(fn, reps):
    """Median process-CPU and wall milliseconds of ``reps`` single calls of ``fn`` (CPU device)."""
    fn()
    cpu, wall = [], []
    for _ in range(reps):
        c0, w0 = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    return {"cpu_ms": statistics.median(cpu) * 1e3, "wall_ms": statistics.median(wall) * 1e3}


def add_cpu_ratios(results):
    """``cpu_speedup_vs_baseline`` (baseline process-CPU time / provider's) beside the wall ratio."""
    for row in results:
        base = next((e for n, e in row["providers"].items() if n.startswith("sdpa") and "cpu_ms" in e), None)
        for entry in row["providers"].values():
            if base is not None and "cpu_ms" in entry:
                entry["cpu_speedup_vs_baseline"] = base["cpu_ms"] / entry["cpu_ms"]


def summarize(results):
    lines = []
    for row in results:
        for name, entry in row["providers"].items():
            if "speedup_vs_baseline" in entry and not name.startswith(("sdpa",)):
                line = f"{row['case']:<34} {name:<14} wall {entry['speedup_vs_baseline']:5.2f}x ({entry['ms']:.2f} ms)"
                if "cpu_speedup_vs_baseline" in entry:
                    line += f"  cpu {entry['cpu_speedup_vs_baseline']:5.2f}x ({entry['cpu_ms']:.2f} ms)"
                lines.append(line)
    return lines


if __name__ == "__main__":
    main()
