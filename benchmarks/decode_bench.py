"""KV-cache decode attention, kernel part: every backend of ``decode_attention`` beside SDPA over the cache.

    python benchmarks/decode_bench.py                         # CPU defaults: GPT-B heads, batch 8, caches 256/576
    python benchmarks/decode_bench.py --batch 8 32 64 --cache-lens 256 576 --layers 12 --json out.json   # GPU
    python benchmarks/decode_bench.py --no-kernels --dtype bfloat16 --e2e-grid 4 --e2e-batch 2   # e2e, bf16 weights

One call = one decode step of every layer (``--layers`` separate caches, cycled so that on a GPU the 50 MB L2 does
not hold the KV of the next call): append the new token's k/v at ``cache_seqlens``, rotate q/k with RoPE
(``--rope``), attend over the cache.

Providers, all on the same inputs:

* ``sdpa_over_cache`` (baseline): the usual static-cache eager step (gpt-fast style): caches in SDPA's preferred
  (B, H, S_max, D) layout, new k/v written with ``scatter_``, then ``scaled_dot_product_attention`` over the whole
  static cache with a boolean mask of the valid keys; RoPE (if on) by LlamaGen's eager formula;
* ``mirai_<backend>``: ``decode_attention(..., backend=...)`` for every backend that runs here (interpreted Triton is
  not timed);
* ``copy_same_bytes``: a device-to-device copy moving the same number of bytes (read + write) as the KV the step
  must read: the practical bandwidth ceiling, measured in the same run;
* on GPU, ``<provider>[graph]``: the same step captured in a CUDA graph and replayed (what the sampler runs), so
  the Python and launch overhead of the eager call drops out.

GB/s counts the bytes a step must move: the K and V rows 0 .. L_b (read), q, k_new, v_new (read) and out (written);
SDPA over the full static cache reads more than that, so its GB/s is an "effective" figure.

End to end (``--e2e``; on by default): sampling ``H*W`` tokens with CFG 2.0 from a LlamaGen GPT (``--e2e-model``,
GPT-B on GPU, tiny on CPU; random weights, the output layer perturbed off zero) — our sampler
(``models.sampling.generate.generate``: static KV cache, ``decode_attention``, the step CUDA-graph-captured on GPU) vs an
eager LlamaGen-style loop (per-step Python, a KV cache grown with ``torch.cat``, SDPA, ``torch.multinomial``).
The model is cast with ``model.to(dtype)`` (``--dtype``: fp16 by default on GPU, bf16 as LlamaGen's sampling
script), which keeps the RoPE table fp32.
Reports ms per image batch, us per step, images/s and GB/s (weights + the average KV bytes per step).
``mirai_jacobi_w<W>`` (``--e2e-windows 16``; ``--no-e2e-eager`` drops the slow eager baseline): the same sampler
with lossless speculative Jacobi decoding (window W, ``--e2e-draft-init``), with its model calls per image and per
batch (a step = one window call) and its speed-up over ``mirai_sampler``; on random weights the acceptance depends
on ``--e2e-output-std`` (see spec_bench.py for trained-model numbers).
"""

from __future__ import annotations

import argparse

import torch

from common import Case, add_common_args, run_cases, setup_from_args, write_json  # noqa: E402  (sets sys.path)

import mirai_kernels as mk  # noqa: E402
from mirai_kernels import backend as B  # noqa: E402
from mirai_kernels.reference.rope import apply_rope_2d as rope_eager  # noqa: E402


def capture(fn):
    """``fn`` captured in a CUDA graph (after a warm-up on a side stream: Triton compiles there); returns a replay
    callable, or ``(None, reason)`` when capture fails (a host sync in the step, for example)."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # reported as skipped, never silently replaced
        return None, f"CUDA graph capture failed: {type(exc).__name__}: {exc}"[:300]
    return graph.replay


def main(argv=None):
    parser = add_common_args(argparse.ArgumentParser(description=__doc__,
                                                     formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 8 on CPU; 8 32 64 on GPU")
    parser.add_argument("--heads", type=int, default=12, help="query heads (GPT-B: 12)")
    parser.add_argument("--heads-kv", type=int, default=None, help="kv heads (default: = heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--cache-lens", type=int, nargs="+", default=[256, 576],
                        help="cache length before the append (all sequences; see --mixed)")
    parser.add_argument("--max-seqlen", type=int, default=None, help="static cache size (default: max len + 1)")
    parser.add_argument("--mixed", action="store_true", help="per-sequence lengths uniform in [1, cache len]")
    parser.add_argument("--seqlen-q", type=int, default=1, help="new tokens per step")
    parser.add_argument("--layers", type=int, default=None, help="caches cycled per call (default: 1 CPU, 12 GPU)")
    parser.add_argument("--rope", action="store_true", help="rotate q and k_new with a 2D RoPE table")
    parser.add_argument("--num-splits", type=int, default=0, help="0 = each backend's heuristic")
    parser.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: fp32 CPU, fp16 GPU)")
    parser.add_argument("--no-graph", action="store_true", help="GPU: do not add the CUDA-graph-replayed providers")
    parser.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                        help="also time end-to-end sampling (ours vs an eager LlamaGen-style loop)")
    parser.add_argument("--e2e-model", default=None, help="GPT preset (default: B on GPU, tiny on CPU)")
    parser.add_argument("--e2e-grid", type=int, default=None, help="token grid side (default: 16 GPU, 8 CPU)")
    parser.add_argument("--e2e-batch", type=int, nargs="+", default=None, help="images (default: 8 32 64 GPU, 4 CPU)")
    parser.add_argument("--e2e-windows", type=int, nargs="*", default=[],
                        help="e2e: add a speculative Jacobi provider per window (default none: plain sampling only)")
    parser.add_argument("--e2e-eager", action=argparse.BooleanOptionalAction, default=True,
                        help="e2e: time the eager LlamaGen-style loop (the baseline; without it mirai_sampler is)")
    parser.add_argument("--e2e-draft-init", default="adaptive", help="e2e: the speculative providers' draft_init")
    parser.add_argument("--e2e-output-std", type=float, default=0.02,
                        help="e2e: std of the random output layer (LlamaGen zero-inits it; larger = peakier "
                             "conditionals, fewer accepted speculative drafts)")
    parser.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                        help="time the decode attention kernels")
    args = parser.parse_args(argv)
    device = setup_from_args(args)
    on_gpu = device.type == "cuda"
    batches = args.batch or ([8, 32, 64] if on_gpu else [8])
    layers = args.layers or (12 if on_gpu else 1)
    dtype = getattr(torch, args.dtype or ("float16" if on_gpu else "float32"))
    heads, heads_kv, head_dim, seqlen_q = args.heads, args.heads_kv or args.heads, args.head_dim, args.seqlen_q
    max_seqlen = args.max_seqlen or max(args.cache_lens) + seqlen_q

    cases = []
    for batch in batches:
        for cache_len in args.cache_lens:
            gen = torch.Generator().manual_seed(batch * 1000 + cache_len)
            lens = (torch.randint(1, cache_len + 1, (batch,), generator=gen) if args.mixed
                    else torch.full((batch,), cache_len)).tolist()
            kv_rows = sum(lens) + batch * seqlen_q
            step_bytes = (2 * kv_rows * heads_kv * head_dim  # K and V rows attended
                          + batch * seqlen_q * (2 * heads + 2 * heads_kv) * head_dim) * dtype.itemsize  # q, out, new
            cases.append(Case(
                name=f"decode B={batch} cache={cache_len}{' mixed' if args.mixed else ''} x{layers} layers",
                params=dict(batch=batch, cache_len=cache_len, lens=lens, max_seqlen=max_seqlen, heads=heads,
                            heads_kv=heads_kv, head_dim=head_dim, seqlen_q=seqlen_q, layers=layers,
                            rope=args.rope, dtype=str(dtype), num_splits=args.num_splits),
                bytes=layers * step_bytes,
            ))

    def make_providers(case):
        p = case.params
        batch = p["batch"]
        seqlens = torch.tensor(p["lens"], dtype=torch.int32, device=device)
        table = mk.rope_2d_table(int(max_seqlen ** 0.5) + 1, head_dim, device=device) if args.rope else None
        shape = (batch, max_seqlen, heads_kv, head_dim)
        caches = [(torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device))
                  for _ in range(layers)]
        q = torch.randn(batch, seqlen_q, heads, head_dim, dtype=dtype, device=device)
        k_new = torch.randn(batch, seqlen_q, heads_kv, head_dim, dtype=dtype, device=device)
        v_new = torch.randn_like(k_new)

        def ours(face):
            def step():
                for k_cache, v_cache in caches:
                    mk.decode_attention(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, rope_table=table,
                                        num_splits=args.num_splits, backend=face)
            return step

        # Baseline: its own (B, H_kv, S_max, D) caches, as SDPA wants them.
        sdpa_caches = [(k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()) for k, v in caches]
        positions = seqlens.long()[:, None] + torch.arange(seqlen_q, device=device)  # (B, S_q)
        rows = positions[:, None, :, None].expand(batch, heads_kv, seqlen_q, head_dim)
        mask = torch.arange(max_seqlen, device=device)[None, None, :] <= positions[:, :, None]  # (B, S_q, S_max)
        mask = mask[:, None]

        def sdpa_step():
            qh, kh, vh = q, k_new, v_new
            if table is not None:
                qh, kh = rope_eager(qh, table, positions), rope_eager(kh, table, positions)
            qh, kh, vh = qh.transpose(1, 2), kh.transpose(1, 2), vh.transpose(1, 2)
            for k_cache, v_cache in sdpa_caches:
                k_cache.scatter_(2, rows, kh)
                v_cache.scatter_(2, rows, vh)
                torch.nn.functional.scaled_dot_product_attention(qh, k_cache, v_cache, attn_mask=mask,
                                                                 enable_gqa=heads != heads_kv)

        providers = {"sdpa_over_cache": sdpa_step}
        for face in B.op_faces("decode_attention"):
            reason = B.face_unavailable_reason("decode_attention", face, device)
            if face == "triton" and B.triton_interpreted():
                reason = "interpreted Triton is a correctness tool, not timed"
            if reason is None and face == "cuda" and (dtype not in (torch.float16, torch.bfloat16)
                                                      or head_dim not in (64, 128)):
                reason = "the cuda backend takes fp16/bf16, head_dim 64/128"
            providers[f"mirai_{face}"] = (None, reason) if reason else ours(face)

        src = torch.empty(int(case.bytes) // 2, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        providers["copy_same_bytes"] = lambda: dst.copy_(src)
        if on_gpu and not args.no_graph:
            # What a sampler runs: the step captured once and replayed, without Python or launch overhead.
            for name in [n for n, fn in providers.items() if callable(fn) and n != "copy_same_bytes"]:
                providers[f"{name}[graph]"] = capture(providers[name])
        return providers

    results = []
    if args.kernels:
        with torch.inference_mode():
            results += run_cases(cases, make_providers, baseline="sdpa_over_cache", device=device, args=args)
    if args.e2e:
        results += end_to_end(args, device, dtype)
    write_json(args.json, "decode_bench", args, device, results, notes={
        "e2e": "end-to-end sampling with CFG 2.0 (batch doubled); GB/s = (weights + mean KV bytes) per step",
        "bytes": "per call: all layers' K/V rows 0..L_b read + q, k_new, v_new read + out written",
        "copy_same_bytes": "device copy of bytes/2 (read + write = bytes): bandwidth ceiling in the same run",
        "baseline": "SDPA over the whole static (B, H, S_max, D) cache with a validity mask, scatter_ append",
    })
    return results


@torch.no_grad()
def eager_llamagen_generate(model, labels, cfg_scale, generator):
    """The baseline sampler: LlamaGen-style eager decoding with a dynamic cache (``torch.cat`` per step), one
    Python iteration per token and per layer, SDPA, ``torch.multinomial``."""
    import torch.nn.functional as F

    config = model.config
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)])
    x = model.cls_embedding(cond, train=False)
    caches = [None] * len(model.layers)
    tokens = []
    for pos in range(config.block_size):
        positions = torch.arange(pos if pos else 0, pos + x.shape[1], device=x.device, dtype=torch.int32)
        for i, layer in enumerate(model.layers):
            attn = layer.attention
            h = layer.attention_norm(x)
            q, k, v = attn.wqkv(h).split([attn.dim, attn.kv_dim, attn.kv_dim], dim=-1)
            q = rope_eager(q.view(*q.shape[:2], attn.n_head, attn.head_dim), model.rope_table, positions)
            k = rope_eager(k.view(*k.shape[:2], attn.n_kv_head, attn.head_dim), model.rope_table, positions)
            v = v.view(*v.shape[:2], attn.n_kv_head, attn.head_dim)
            if caches[i] is not None:
                k, v = torch.cat([caches[i][0], k], 1), torch.cat([caches[i][1], v], 1)
            caches[i] = (k, v)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 enable_gqa=attn.n_head != attn.n_kv_head)
            x = x + attn.wo(out.transpose(1, 2).reshape(*x.shape[:2], -1))
            x = x + layer.feed_forward(layer.ffn_norm(x))
        logits = model.output(model.norm(x[:, -1])).float()
        cond_logits, uncond_logits = logits.chunk(2)
        probs = (uncond_logits + cfg_scale * (cond_logits - uncond_logits)).softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        tokens.append(nxt)
        x = model.tok_embeddings(nxt.repeat(2, 1))
    return torch.cat(tokens, 1)


def end_to_end(args, device, dtype):
    from models.sampling.generate import generate
    from models.nets.gpt import build_gpt
    from models.sampling.speculative import speculative_generate

    on_gpu = device.type == "cuda"
    preset = args.e2e_model or ("B" if on_gpu else "tiny")
    side = args.e2e_grid or (16 if on_gpu else 8)
    torch.manual_seed(0)
    model = build_gpt(preset, grid=side, vocab_size=16384, num_classes=1000)
    with torch.no_grad():
        # LlamaGen zero-inits it: sampled tokens should vary, and with a zero layer every conditional is uniform,
        # so every speculative draft would be accepted.
        model.output.weight.normal_(0, args.e2e_output_std)
    model = model.to(device=device, dtype=dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = model.config
    n_steps = cfg.block_size
    cases = []
    for batch in args.e2e_batch or ([8, 32, 64] if on_gpu else [4]):
        mean_kv_rows = 2 * batch * (cfg.cls_token_num + n_steps / 2)  # CFG doubles the batch
        kv_bytes = 2 * cfg.n_layer * mean_kv_rows * cfg.dim * dtype.itemsize
        cases.append(Case(
            name=f"sample GPT-{preset} {side}x{side} B={batch} cfg=2.0",
            params=dict(preset=preset, grid=side, batch=batch, steps=n_steps, dtype=str(dtype)),
            bytes=n_steps * (weight_bytes + kv_bytes),
        ))

    def make_providers(case):
        labels = torch.arange(case.params["batch"], device=device) % 1000
        gen = torch.Generator(device=device)
        providers = {
            "eager_llamagen_dynamic": lambda: eager_llamagen_generate(model, labels, 2.0, gen.manual_seed(0)),
            "mirai_sampler": lambda: generate(model, labels, cfg_scale=2.0, generator=gen.manual_seed(0)),
        }
        if not args.e2e_eager:
            del providers["eager_llamagen_dynamic"]
        for window in args.e2e_windows:
            # The same sampler API with speculative="jacobi": the window step CUDA-graph-captured on GPU as the
            # plain step is; same seed, so every timed call decodes the same images in the same number of calls.
            providers[f"mirai_jacobi_w{window}"] = (
                lambda w=window: generate(model, labels, cfg_scale=2.0, generator=gen.manual_seed(0),
                                          speculative="jacobi", window=w, draft_init=args.e2e_draft_init))
        return providers

    baseline = "eager_llamagen_dynamic" if args.e2e_eager else "mirai_sampler"
    results = run_cases(cases, make_providers, baseline=baseline, device=device, args=args)
    for row in results:
        labels = torch.arange(row["params"]["batch"], device=device) % 1000
        for name, entry in row["providers"].items():
            if "ms" not in entry:
                continue
            steps = row["params"]["steps"]
            if name.startswith("mirai_jacobi_w"):
                # Calls of the timed generation (same seed): per image (prefill included) and for the whole
                # batch (its slowest row), measured once more outside the timing.
                window = int(name.rsplit("w", 1)[1])
                _, stats = speculative_generate(model, labels, steps, window=window, init=args.e2e_draft_init,
                                                cfg_scale=2.0, return_stats=True,
                                                generator=torch.Generator(device=device).manual_seed(0))
                calls = stats["calls"].float() + 1
                entry.update(calls_per_image_mean=float(calls.mean()), calls_per_image_max=int(calls.max()),
                             batch_calls=stats["steps"] + 1, fewer_calls_per_image=steps / float(calls.mean()))
                steps = stats["steps"] + 1
                entry.pop("gbps", None)  # the case's bytes assume one call per token
            entry["us_per_step"] = entry["ms"] * 1e3 / steps
            entry["images_per_s"] = row["params"]["batch"] / (entry["ms"] * 1e-3)
        plain = row["providers"].get("mirai_sampler", {}).get("ms")
        for name, entry in row["providers"].items():
            if plain and "ms" in entry and name.startswith("mirai_jacobi_w"):
                entry["speedup_vs_mirai_sampler"] = plain / entry["ms"]
        print(f"  {row['case']}: " + ", ".join(
            f"{name} {e['us_per_step']:.0f} us/step {e['images_per_s']:.1f} img/s"
            for name, e in row["providers"].items() if "us_per_step" in e))
    return results


if __name__ == "__main__":
    main()
