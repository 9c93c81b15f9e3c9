"""Foresight loss, forward + backward: the fused ops and ``ForesightHeads`` beside the paper code's eager PyTorch.

    python benchmarks/foresight_bench.py                      # CPU quick defaults (small hidden sizes)
    python benchmarks/foresight_bench.py --gpt-b              # GPT-B Mirai-E: B=32, N=256, d=768, K=3, 2048, Z=768
    python benchmarks/foresight_bench.py --batch 8 --hidden 2048 --z-dim 768 --parts fused --json out.json

Two parts (``--parts``):

* ``fused``: the heads' last ``Linear(hidden -> Z)`` + shifted cosine loss. Baseline ``eager``: Linear per head,
  then per head slice, cat with the prefix, normalize both, multiply, mean (the paper code). Providers:
  ``mirai_<backend>`` = :func:`mirai_kernels.fused_linear_cosine_loss` (gradients in the forward pass);
  ``unfused_<backend>`` = einsum + :func:`mirai_kernels.foresight_cosine_loss`; ``recompute_<backend>`` = the rejected
  alternative (same cosine kernels, projection recomputed chunk by chunk in backward), kept to re-measure the choice.
* ``heads``: the whole K-head MLP + loss. Baseline ``paper_eager``: K separate ``nn.Sequential`` MLPs on the full
  hidden state, then the same eager loss. Providers: ``ForesightHeads`` per backend, with ``recompute`` off and on;
  ``gemm_floor`` (not an implementation) runs only the GEMMs every exact forward + backward needs, each one
  threaded by BLAS as ATen calls it: the bound of any provider that runs them that way. (On CPU the C++ heads run
  them as single-threaded tasks side by side, which beats this row at 2+ threads.)

CPU timing (``--thread-counts``, default 1 and torch's default; ``--rounds``): every provider is timed once per
round, rounds interleaved, wall and process-CPU time, so load from other processes on a shared machine hits all
providers alike; the table gives median and [min] over rounds and the ratios of both.

Each provider is timed forward + backward (gradients w.r.t. the input and all weights). Memory per provider:
``saved_bytes`` = bytes autograd saves for backward (``saved_tensors_hooks``, by storage, parameters included),
``saved_nonparam_bytes`` the same without parameter storages, and on GPU ``peak_bytes`` (peak allocated above the
start during one forward + backward). Under bf16/fp16 the ``heads`` part runs under ``torch.autocast`` (parameters
fp32), the ``fused`` part on tensors of that dtype.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import Case, add_common_args, run_cases, setup_from_args, write_json  # noqa: E402  (sets sys.path)

import mirai_kernels as mk  # noqa: E402
from mirai_kernels import backend as B  # noqa: E402
from mirai_kernels.modules import ForesightHeads  # noqa: E402
from mirai_kernels.ops import foresight as fops  # noqa: E402
from mirai_kernels.reference import foresight as ref  # noqa: E402
from mirai_kernels.triton.foresight import chunk_batches  # noqa: E402  (the fused op's chunking, re-timed here)


def eager_loss(projs, targets, raster_offsets, prefix, head_weights):
    total, per_head = ref.paper_heads_loss(projs, targets, raster_offsets, prefix)
    w = torch.tensor(head_weights, dtype=per_head.dtype, device=per_head.device)
    return (w * per_head).sum()


class RecomputeLinearCos(torch.autograd.Function):
    """The alternative to gradients-in-forward: save x, recompute each chunk's projection in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, targets, tpos, face):
        fwd = fops.OP.op(face, "fwd")
        batch, seqlen, n_heads, hidden = x.shape
        cos = x.new_empty((batch, seqlen, n_heads), dtype=torch.float32)
        for k in range(n_heads):
            tk = tpos[:, k:k + 1].contiguous()
            for b0, b1 in chunk_batches(batch, seqlen, fops.CHUNK_ROWS):
                p = torch.addmm(bias[k], x[b0:b1, :, k].reshape(-1, hidden), weight[k].t())
                cos[b0:b1, :, k:k + 1] = fwd(p.view(b1 - b0, seqlen, 1, -1), targets[b0:b1], tk)
        ctx.save_for_backward(x, weight, bias, targets, tpos)
        ctx.face = face
        return cos

    @staticmethod
    def backward(ctx, grad_cos):
        x, weight, bias, targets, tpos = ctx.saved_tensors
        bwd = fops.OP.op(ctx.face, "bwd")
        batch, seqlen, n_heads, hidden = x.shape
        gx, gw, gb = torch.empty_like(x), torch.zeros_like(weight), torch.zeros_like(bias)
        for k in range(n_heads):
            tk = tpos[:, k:k + 1].contiguous()
            for b0, b1 in chunk_batches(batch, seqlen, fops.CHUNK_ROWS):
                xk = x[b0:b1, :, k].reshape(-1, hidden)
                p = torch.addmm(bias[k], xk, weight[k].t()).view(b1 - b0, seqlen, 1, -1)
                dp = bwd(grad_cos[b0:b1, :, k:k + 1], p, targets[b0:b1], tk).view(-1, p.shape[-1])
                gx[b0:b1, :, k] = (dp @ weight[k]).view(b1 - b0, seqlen, hidden)
                gw[k] += dp.t() @ xk
                gb[k] += dp.sum(0)
        return gx, gw, gb, None, None, None


def gemm_floor_step(module, rows):
    """Not an implementation: only the GEMMs any exact forward + backward of the heads must run (per layer: forward,
    input gradient, weight gradient; the first layer's input gradient too), on preallocated operands, nothing else,
    each threaded by BLAS. The lower bound of every provider that runs them one after another."""
    k, hid, d, z = module.n_heads, module.hidden, module.d_model, module.z_dim
    dev = module.weight_out.device
    h2, a = torch.randn(rows, d, device=dev), torch.randn(k, rows, hid, device=dev)
    g, dp = torch.randn(k, rows, hid, device=dev), torch.randn(rows, z, device=dev)
    w_in, w_out = module.weight_in.detach(), module.weight_out.detach()
    w_mid = [w.detach() for w in module.weights_mid]
    gx, gw = torch.empty(rows, hid, device=dev), torch.empty(z, hid, device=dev)
    ga = g.transpose(0, 1).reshape(rows, k * hid)

    def step():
        torch.mm(h2, w_in.t())
        for w in w_mid:
            torch.bmm(a, w.transpose(1, 2))
            torch.bmm(g.transpose(1, 2), a)
            torch.bmm(g, w)
        for i in range(k):
            torch.mm(a[i], w_out[i].t())
            gx.addmm_(dp, w_out[i], beta=0)
            gw.addmm_(dp.t(), a[i], beta=0)
        torch.mm(ga, w_in)
        torch.mm(ga.t(), h2)
        return a.new_zeros(()).requires_grad_()

    return step


def face_reason(op, face, device, dtype):
    reason = B.face_unavailable_reason(op, face, device)
    if reason is None and face == "triton" and B.triton_interpreted():
        reason = "interpreted Triton is a correctness tool, not timed"
    if reason is None and face == "triton" and dtype == torch.float64:
        reason = "no fp64 Triton backend"
    return reason


def interleaved_cpu_case(case, make_providers, baseline, args, memory, threads):
    """CPU timing for a loaded, shared machine: ``args.rounds`` rounds, each timing every provider once (as many
    calls as fill ``args.min_run_time``), so a burst of load from other processes hits all providers alike; wall
    and process-CPU time per call, median and min over rounds. Ratios are ``baseline / provider`` per round
    statistic."""
    providers = make_providers(case)
    live = {n: f for n, f in providers.items() if not (f is None or isinstance(f, tuple))}
    calls = {}
    for name, fn in live.items():
        fn()  # warm-up: first-call allocation, lazy imports
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(args.min_run_time / max(time.perf_counter() - t0, 1e-6)))
    wall = {n: [] for n in live}
    cpu = {n: [] for n in live}
    for _ in range(args.rounds):
        for name, fn in live.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(calls[name]):
                fn()
            wall[name].append((time.perf_counter() - w0) / calls[name] * 1e3)
            cpu[name].append((time.process_time() - c0) / calls[name] * 1e3)
    row = {"case": case.name, "params": dict(case.params, threads=threads), "providers": {}}
    for name, fn in providers.items():
        if name not in live:
            row["providers"][name] = {"skipped": fn[1] if isinstance(fn, tuple) else "not available here"}
            continue
        entry = {"ms": statistics.median(wall[name]), "ms_min": min(wall[name]),
                 "cpu_ms": statistics.median(cpu[name]), "cpu_ms_min": min(cpu[name]),
                 "wall_ms_rounds": [round(v, 3) for v in wall[name]],
                 "cpu_ms_rounds": [round(v, 3) for v in cpu[name]], "calls_per_round": calls[name]}
        if case.flops:
            entry["tflops"] = case.flops / (entry["ms"] * 1e-3) / 1e12
        entry.update(memory(case, name, fn) or {})
        row["providers"][name] = entry
    base = row["providers"].get(baseline, {})
    for entry in row["providers"].values():
        if "ms" in entry and "ms" in base:
            for key, out in (("ms", "speedup_vs_baseline"), ("ms_min", "speedup_min_vs_baseline"),
                             ("cpu_ms", "cpu_speedup_vs_baseline"), ("cpu_ms_min", "cpu_speedup_min_vs_baseline")):
                entry[out] = base[key] / entry[key]
    print(f"\n{row['case']}  threads={threads}  {args.rounds} interleaved rounds  "
          f"(ratios = {baseline} / provider; wall and process-CPU time, median [min])")
    for name, entry in row["providers"].items():
        if "ms" not in entry:
            print(f"    skip  {name:<24} {entry['skipped']}")
            continue
        print(f"  {name:<24} wall {entry['ms']:9.3f} ms [{entry['ms_min']:9.3f}]  {entry['speedup_vs_baseline']:5.2f}x "
              f"[{entry['speedup_min_vs_baseline']:5.2f}x]   cpu {entry['cpu_ms']:9.3f} ms [{entry['cpu_ms_min']:9.3f}]"
              f"  {entry['cpu_speedup_vs_baseline']:5.2f}x [{entry['cpu_speedup_min_vs_baseline']:5.2f}x]")
    return row


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--gpt-b", action="store_true", help="GPT-B Mirai-E shapes (B=32, d=768, hidden 2048, Z=768)")
    parser.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 32 on GPU / --gpt-b")
    parser.add_argument("--grid", type=int, default=16, help="square grid side; N = prefix + grid^2 - 1")
    parser.add_argument("--prefix", type=int, default=1)
    parser.add_argument("--offsets", type=int, nargs="+", default=[0, 1, 16], help="raster offsets (one per head)")
    parser.add_argument("--boundary", default="raster", choices=["raster", "grid"])
    parser.add_argument("--d-model", type=int, default=None, help="default: 256 CPU, 768 GPU / --gpt-b")
    parser.add_argument("--hidden", type=int, default=None, help="default: 512 CPU, 2048 GPU / --gpt-b")
    parser.add_argument("--z-dim", type=int, default=None, help="default: 256 CPU, 768 GPU / --gpt-b")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: fp32 CPU, bf16 GPU)")
    parser.add_argument("--parts", nargs="+", default=["fused", "heads"], choices=["fused", "heads"])
    parser.add_argument("--thread-counts", type=int, nargs="+", default=None,
                        help="CPU: run every case at each of these torch thread counts, in this one process "
                             "(default: [--threads] if given, else 1 and torch's default)")
    parser.add_argument("--rounds", type=int, default=7,
                        help="CPU: interleaved rounds (each times every provider once, wall and process-CPU time)")
    args = parser.parse_args(argv)
    device = setup_from_args(args)
    if device.type == "cpu":
        thread_counts = args.thread_counts or ([args.threads] if args.threads else
                                               sorted({1, torch.get_num_threads()}))
    else:
        thread_counts = [None]
    big = args.gpt_b or device.type == "cuda"
    batch = args.batch or (32 if big else 2)
    d_model = args.d_model or (768 if big else 256)
    hidden = args.hidden or (2048 if big else 512)
    z_dim = args.z_dim or (768 if big else 256)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    seqlen = args.prefix + args.grid * args.grid - 1
    offsets, n_heads = list(args.offsets), len(args.offsets)
    weights = [2.0] * n_heads
    pair_kw = dict(grid=(args.grid, args.grid), prefix=args.prefix, boundary=args.boundary, head_weights=weights)
    if args.boundary != "raster" or args.prefix != 1:
        print("note: the eager baselines implement the paper's raster boundary with the prefix aligned; other "
              "settings time a different pairing")

    base = dict(batch=batch, seqlen=seqlen, n_heads=n_heads, hidden=hidden, z_dim=z_dim, dtype=str(dtype),
                offsets=offsets, boundary=args.boundary)
    cases = []
    gemm = 2 * batch * seqlen * n_heads * hidden * z_dim  # one pass of the last layer
    if "fused" in args.parts:
        cases.append(Case(name=f"fused linear+cosine fwd+bwd K={n_heads}", params=dict(part="fused", **base),
                          flops=3 * gemm))
    if "heads" in args.parts:
        head_flops = 2 * batch * seqlen * n_heads * (d_model * hidden + (args.depth - 2) * hidden * hidden) + gemm
        cases.append(Case(name=f"foresight heads + loss fwd+bwd K={n_heads} depth={args.depth}",
                          params=dict(part="heads", d_model=d_model, depth=args.depth, **base), flops=3 * head_flops))

    forwards = {}  # provider -> forward-only callable returning the loss (for the memory figures)
    param_storages = set()

    def make_fused(case):
        x = torch.randn(batch, seqlen, n_heads, hidden, device=device, dtype=dtype, requires_grad=True)
        weight = (torch.randn(n_heads, z_dim, hidden, device=device) * 0.02).to(dtype).requires_grad_()
        bias = torch.zeros(n_heads, z_dim, device=device, dtype=dtype, requires_grad=True)
        targets = torch.randn(batch, seqlen, z_dim, device=device, dtype=dtype)
        inputs = (x, weight, bias)
        # In a model the last layer's weight and bias are parameters: saving them costs nothing extra.
        param_storages.update(t.untyped_storage().data_ptr() for t in (weight, bias))
        tpos = fops.pairing_table(seqlen, (args.grid, args.grid), offsets, prefix=args.prefix,
                                  boundary=args.boundary, device=device)
        counts = ((tpos >= 0).sum(0) * batch).clamp(min=1).float()
        lam = torch.tensor(weights, device=device)

        fwds = {"eager": lambda: eager_loss(
            [torch.nn.functional.linear(x[:, :, k], weight[k], bias[k]) for k in range(n_heads)], targets, offsets,
            args.prefix, weights)}
        for face in B.op_faces(fops.FUSED_OP.name):
            if face == "reference":
                continue
            reason = face_reason(fops.FUSED_OP.name, face, device, dtype)
            if reason:
                for name in (f"mirai_{face}", f"unfused_{face}", f"recompute_{face}"):
                    fwds[name] = (None, reason)
                continue
            fwds[f"mirai_{face}"] = lambda face=face: mk.fused_linear_cosine_loss(
                x, weight, bias, targets, offsets, backend=face, **pair_kw)[0]
            fwds[f"unfused_{face}"] = lambda face=face: mk.foresight_cosine_loss(
                torch.einsum("bnkh,kzh->bnkz", x, weight) + bias, targets, offsets, backend=face, **pair_kw)[0]
            fwds[f"recompute_{face}"] = lambda face=face: (
                -(RecomputeLinearCos.apply(x, weight, bias, targets, tpos, face).sum((0, 1)) / counts) * lam).sum()
        return fwds, inputs

    def make_heads(case):
        module = ForesightHeads(d_model, z_dim, offsets, grid=(args.grid, args.grid), prefix=args.prefix,
                                boundary=args.boundary, head_weights=weights, hidden=hidden,
                                depth=args.depth).to(device)
        mlps = torch.nn.ModuleList(module.head_mlps())
        params = list(module.parameters()) + list(mlps.parameters())
        param_storages.update(p.untyped_storage().data_ptr() for p in params)
        h = torch.randn(batch, seqlen, d_model, device=device, requires_grad=True)
        targets = torch.randn(batch, seqlen, z_dim, device=device)
        lowp = dtype in (torch.float16, torch.bfloat16)

        def autocast():
            return torch.autocast(device.type, dtype=dtype, enabled=lowp)

        def paper():
            with autocast():
                projs = [mlp(h) for mlp in mlps]
                return eager_loss([p.float() for p in projs], targets, offsets, args.prefix, weights)

        fwds = {"paper_eager": paper}
        if args.depth >= 2 and not lowp:
            fwds["gemm_floor"] = gemm_floor_step(module, batch * seqlen)
        for face in B.op_faces(fops.FUSED_OP.name):
            if face == "reference":
                continue
            reason = face_reason(fops.FUSED_OP.name, face, device, dtype)
            for recompute in (False, True):
                name = f"heads_{face}" + ("_recompute" if recompute else "")
                if reason:
                    fwds[name] = (None, reason)
                    continue

                def run(face=face, recompute=recompute):
                    module.backend, module.recompute = face, recompute
                    with autocast():
                        return module(h, targets)[0]

                fwds[name] = run
        return fwds, (h,) + tuple(module.parameters()) + tuple(mlps.parameters())

    def make_providers(case):
        fwds, inputs = (make_fused if case.params["part"] == "fused" else make_heads)(case)
        forwards.clear()
        providers = {}
        for name, fwd in fwds.items():
            if isinstance(fwd, tuple):
                providers[name] = fwd
                continue
            forwards[name] = fwd

            def step(fwd=fwd):
                loss = fwd()
                wanted = [t for t in inputs if t.requires_grad]
                return torch.autograd.grad(loss, wanted, allow_unused=True)

            providers[name] = step
        return providers

    def memory(case, name, fn):
        out = {}
        fwd = forwards[name]
        seen, total, nonparam = set(), 0, 0

        def pack(t):
            nonlocal total, nonparam
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
                if key not in param_storages and not (isinstance(t, torch.nn.Parameter)):
                    nonparam += storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fwd()
        del loss
        out["saved_bytes"], out["saved_nonparam_bytes"] = total, nonparam
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            start = torch.cuda.memory_allocated(device)
            fn()
            torch.cuda.synchronize(device)
            out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device) - start)
        return out

    results = []
    for threads, case in [(t, c) for t in thread_counts for c in cases]:
        baseline = "eager" if case.params["part"] == "fused" else "paper_eager"
        if threads is None:
            rows = run_cases([case], make_providers, baseline=baseline, device=device, args=args, memory=memory)
        else:
            torch.set_num_threads(threads)
            rows = [interleaved_cpu_case(case, make_providers, baseline, args, memory, threads)]
        for row in rows:
            base_entry = row["providers"].get(baseline, {})
            for entry in row["providers"].values():
                for key in ("saved_bytes", "saved_nonparam_bytes", "peak_bytes"):
                    if key in entry and base_entry.get(key):
                        entry[key.replace("_bytes", "_ratio_vs_baseline")] = entry[key] / base_entry[key]
            ratios = {n: {k: round(v, 3) for k, v in e.items() if k.endswith("ratio_vs_baseline")}
                      for n, e in row["providers"].items() if "ms" in e}
            print("  memory ratios vs", baseline, ratios)
        results += rows
    write_json(args.json, "foresight_bench", args, device, results, notes={
        "timing": "forward + backward (grads w.r.t. inputs and weights), median; CPU: `rounds` interleaved rounds "
                  "per thread count (params.threads), wall `ms` and process-CPU `cpu_ms`, median and min",
        "saved_bytes": "autograd saved tensors during one forward, by storage, parameters included",
        "saved_nonparam_bytes": "the same without parameter storages",
        "peak_bytes": "GPU only: peak allocated above the start during one forward + backward",
        "targets": "fused >= 1.5x faster and <= 0.7x memory vs eager; heads >= 1.2x and <= 0.8x vs paper_eager",
    })
    return results


if __name__ == "__main__":
    main()
