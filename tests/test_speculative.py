"""Speculative Jacobi decoding (models/sampling/speculative.py): losslessness against the exact autoregressive joint
distribution (enumerated), with the power check that broken acceptance rules fail the same test; greedy identity
with plain decoding at vocab 16384; per-row progress; rollback (cache rows past ``cache_seqlens`` are dead);
finishing exactly at H*W; torch.compile(fullgraph=True) of the step."""

import itertools
import os

import pytest
import torch

from models.nets.gpt import build_gpt
from models.sampling.generate import DeviceRNG, filter_logits, generate
from models.sampling.speculative import JacobiStep, speculative_generate

VOCAB, GRID = 4, (2, 2)  # 4^4 = 256 whole sequences: the joint distribution is enumerable


def peaked_gpt(vocab=VOCAB, grid=GRID, dim=16, n_layer=1, seed=0, out_std=0.35):
    """A random GPT whose distributions are far from uniform and depend on the context (LlamaGen zero-inits the
    output layer, which would make every conditional uniform and every draft acceptable)."""
    torch.manual_seed(seed)
    model = build_gpt("micro", vocab_size=vocab, grid=grid, num_classes=3, dim=dim, n_layer=n_layer, n_head=2,
                      token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() > 1 else 0.1).add_(1.0 if p.dim() == 1 else 0.0)
        model.output.weight.normal_(0, out_std)
    return model.eval()


def exact_joint(model, label, *, cfg_scale=1.0, cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0):
    """P(sequence) for every sequence (itertools order) from teacher-forced logits, written independently of the
    sampler: guidance per position, temperature, the plain sampler's filter, softmax, product of conditionals."""
    n = model.config.block_size
    seqs = torch.tensor(list(itertools.product(range(model.config.vocab_size), repeat=n)))
    with torch.no_grad():
        logits, _ = model(seqs[:, :-1], torch.full((len(seqs),), label))
        if cfg_scale > 1:
            uncond, _ = model(seqs[:, :-1], torch.full((len(seqs),), model.null_class))
            guided = uncond + cfg_scale * (logits - uncond)
            on = torch.tensor([cfg_interval <= -1 or t == 0 or t - 1 <= cfg_interval for t in range(n)])
            logits = torch.where(on[None, :, None], guided, logits)
    logits = logits.double() / temperature
    flat = filter_logits(logits.reshape(-1, logits.shape[-1]), top_k, top_p).view_as(logits)
    logp = flat.log_softmax(-1).gather(-1, seqs[..., None]).squeeze(-1).sum(-1)
    return seqs, logp.exp()


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit; cells expected below 5 are pooled (so the chi-square law holds)."""
    m = counts.sum()
    expected = probs * m
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    exp = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    if bool((obs[exp == 0] > 0).any()):
        return 0.0  # a sequence of probability zero was sampled
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(exp) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


def sequence_counts(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    n = tokens.shape[1]
    index = (tokens.long() * (vocab ** torch.arange(n - 1, -1, -1))).sum(-1)
    return torch.bincount(index, minlength=vocab ** n)


SAMPLES = 20000
P_MIN = 1e-4


CASES = {
    # window < H*W, uniform drafts, no filter
    "w3-random": dict(window=3, init="random"),
    # CFG on every window position, top-k, spatial prior (point-mass q)
    "w4-prior-cfg-topk": dict(window=4, init="prior", cfg_scale=2.5, top_k=3),
    # the left prior (every fresh draft repeats the last known token), CFG
    "w3-left-cfg": dict(window=3, init="left", cfg_scale=2.0),
    # no Jacobi redraft: the window redrafted from the spatial prior after every call
    "w3-prior-reset-cfg": dict(window=3, init="prior-reset", cfg_scale=2.0),
    # the adaptive copy prior (offset chosen from the committed tokens; Jacobi or reset per row)
    "w3-adaptive": dict(window=3, init="adaptive"),
    # window > H*W (the dead tail), cfg_interval switching guidance off inside the window, top-p and temperature
    "w6-prior-cfg-interval-topp": dict(window=6, init="prior", cfg_scale=2.0, cfg_interval=0, top_p=0.9,
                                       temperature=1.5),
}


def _sample(model, kwargs, rule="exact", seed=1):
    sampling = {k: v for k, v in kwargs.items() if k not in ("window", "init")}
    labels = torch.full((SAMPLES,), 1)
    gen = torch.Generator().manual_seed(seed)
    tokens, stats = speculative_generate(model, labels, model.config.block_size, window=kwargs["window"],
                                         init=kwargs["init"], generator=gen, return_stats=True, _rule=rule,
                                         **sampling)
    return tokens, stats, sampling


@pytest.mark.parametrize("case", list(CASES))
def test_lossless_against_enumerated_joint(case):
    """20000 sequences sampled speculatively fit the exact joint (chi-square p > 1e-4 over the 256 sequences).
    The test has power: a sample of the same size from a distribution at total variation 0.02 from the exact one
    fails it (checked here), and so do the broken rules (test below). Rows finish after different numbers of
    calls, so per-row progress is exercised too."""
    model = peaked_gpt()
    tokens, stats, sampling = _sample(model, CASES[case])
    _, probs = exact_joint(model, 1, **sampling)
    assert tokens.shape == (SAMPLES, 4)
    counts = sequence_counts(tokens, VOCAB)
    assert chi_square_pvalue(counts, probs) > P_MIN
    assert len(set(stats["calls"].tolist())) > 1, "rows should finish after different numbers of calls"
    # Power: the same test rejects a distribution at TV 0.02 (mixed toward uniform) at this sample size.
    uniform = torch.full_like(probs, 1 / len(probs))
    eps = 0.02 / (0.5 * (probs - uniform).abs().sum())
    off = (1 - eps) * probs + eps * uniform
    assert abs(0.5 * (off - probs).abs().sum() - 0.02) < 1e-9
    fake = torch.multinomial(off.float(), SAMPLES, replacement=True, generator=torch.Generator().manual_seed(2))
    assert chi_square_pvalue(torch.bincount(fake, minlength=len(probs)), probs) < P_MIN


@pytest.mark.parametrize("rule,case", [("accept_always", "w4-prior-cfg-topk"), ("resample_p", "w3-random"),
                                       ("resample_p", "w4-prior-cfg-topk"), ("reset_keeps_q", "w3-prior-reset-cfg"),
                                       ("reset_keeps_q", "w3-adaptive")])
def test_broken_rules_fail_the_lossless_test(rule, case):
    """Accepting every draft, resampling a rejected position from p instead of norm(max(p - q, 0)), or verifying a
    reset window's drafts against the q of the drafts they replaced, is not lossless; the chi-square test above must
    see it."""
    model = peaked_gpt()
    tokens, _, sampling = _sample(model, CASES[case], rule=rule)
    _, probs = exact_joint(model, 1, **sampling)
    assert chi_square_pvalue(sequence_counts(tokens, VOCAB), probs) < P_MIN


def big_vocab_gpt(seed=0):
    torch.manual_seed(seed)
    model = build_gpt("micro", vocab_size=16384, grid=4, num_classes=10, dim=64, n_layer=2, n_head=2)
    with torch.no_grad():
        model.output.weight.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("window,init,cfg_scale", [(2, "random", 3.0), (4, "prior", 1.0), (8, "prior", 3.0),
                                                    (5, "left", 3.0), (6, "prior-reset", 3.0), (7, "adaptive", 3.0),
                                                    (32, "random", 1.0)])
def test_greedy_matches_plain_greedy(window, init, cfg_scale):
    """temperature 0 (and top_k = 1 at temperature 1): token-identical to plain greedy decoding at vocab 16384,
    for windows shorter and longer than H*W = 16."""
    model = big_vocab_gpt()
    labels = torch.tensor([1, 2, 3])
    plain = generate(model, labels, temperature=0, cfg_scale=cfg_scale)
    spec = generate(model, labels, temperature=0, cfg_scale=cfg_scale, speculative="jacobi", window=window,
                    draft_init=init)
    assert spec.dtype == plain.dtype and torch.equal(spec, plain)
    topk1 = generate(model, labels, top_k=1, cfg_scale=cfg_scale, speculative="jacobi", window=window,
                     draft_init=init, generator=torch.Generator().manual_seed(0))
    assert torch.equal(topk1, plain)
    # LlamaGen's call: max_new_tokens given -> a prefix, int32
    short = generate(model, labels, 7, temperature=0, cfg_scale=cfg_scale, speculative="jacobi", window=window)
    assert short.dtype == torch.int32 and torch.equal(short.long(), plain[:, :7])


def test_per_row_progress_and_dead_cache_rows():
    """Rows advance by their own accepted counts: a greedy batch whose rows accept differently (different labels;
    checked: their call counts differ) ends equal to plain greedy row by row. Every step: ``cache_seqlens`` = prefix + committed - 1 (never past the
    accepted tokens), finished rows do not change, and the cache rows past ``cache_seqlens`` are dead: they are
    overwritten with NaN after every step and the output is still exact (a rollback that read a rejected draft's
    K/V row would turn NaN)."""
    model = big_vocab_gpt(seed=3)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    plain = generate(model, labels, temperature=0, cfg_scale=2.0)
    n, prefix, window = model.config.block_size, model.config.cls_token_num, 4
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)])
    model.setup_caches(cond.shape[0], prefix + n + window)
    step = JacobiStep(model, 6, window=window, guided=True, cfg_scale=2.0, cfg_interval=-1, temperature=0.0,
                      top_k=0, top_p=1.0, rng=DeviceRNG(0, "cpu"), init="prior", device=torch.device("cpu"))
    with torch.no_grad():
        step.prefill(cond)
        for _ in range(n - 1):
            before = step.seq.clone(), step.n.clone()
            step()
            assert torch.equal(step.cache_seqlens, (prefix + step.n - 1).repeat(2).int())
            finished = before[1] >= n
            assert torch.equal(step.seq[finished, :n], before[0][finished, :n])
            assert torch.equal(step.n[finished], before[1][finished])
            for layer in model.layers:
                for buf in (layer.attention.kv_cache.k, layer.attention.kv_cache.v):
                    rows = torch.arange(buf.shape[1])[None, :] >= step.cache_seqlens[:, None]
                    buf[rows] = float("nan")
    assert torch.equal(step.n, torch.full((6,), n))
    assert torch.equal(step.seq[:, :n], plain)
    assert len(set(step.calls.tolist())) > 1, "the rows should have needed different numbers of calls"
    model.clear_caches()


def test_finishes_exactly_at_the_end():
    """Windows reaching past H*W commit nothing past it: the tokens are (B, H*W), every row has exactly H*W
    committed, and the number of calls never exceeds H*W - 1."""
    model = peaked_gpt(seed=4)
    tokens, stats = speculative_generate(model, torch.tensor([0, 1, 2, 0]), 4, window=8, init="prior",
                                         cfg_scale=2.0, generator=torch.Generator().manual_seed(0),
                                         return_stats=True)
    assert tokens.shape == (4, 4) and int(tokens.max()) < VOCAB
    assert int(stats["calls"].max()) <= 3 and stats["steps"] <= 3


def test_bad_arguments():
    model = peaked_gpt()
    with pytest.raises(ValueError, match="speculative"):
        generate(model, torch.tensor([0]), speculative="medusa")
    with pytest.raises(ValueError, match="window"):
        generate(model, torch.tensor([0]), speculative="jacobi", window=1)
    with pytest.raises(ValueError, match="init"):
        generate(model, torch.tensor([0]), speculative="jacobi", draft_init="above")


@pytest.mark.parametrize("init", ["prior", "adaptive"])
def test_step_compiles_fullgraph(init):
    """The CPU stand-in for CUDA-graph capture: torch.compile traces the whole speculative step (cached window
    forward, guidance, verification, residual resampling, redrafting -- Jacobi, and the adaptive prior's offset
    choice and reset --, cache advance) with no graph break, and it gives the eager step's state."""
    torch._dynamo.reset()
    model = peaked_gpt(seed=5, vocab=8, grid=(3, 3))
    labels = torch.tensor([0, 2])
    cond = torch.cat([labels, torch.full_like(labels, model.null_class)])

    def run(compiled):
        model.setup_caches(4, 1 + 9 + 4)
        step = JacobiStep(model, 2, window=4, guided=True, cfg_scale=2.0, cfg_interval=-1, temperature=1.0,
                          top_k=5, top_p=0.9, rng=DeviceRNG(7, "cpu"), init=init, device=torch.device("cpu"))
        with torch.no_grad():
            step.prefill(cond)
            fn = torch.compile(step.__call__, fullgraph=True, backend="aot_eager") if compiled else step
            for _ in range(3):
                fn()
        return step.seq.clone(), step.n.clone(), step.cache_seqlens.clone()

    eager, compiled = run(False), run(True)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_decode_faces_agree_at_window_queries():
    """The speculative window's attention call -- S_q = 16 new tokens appended at per-row cache lengths (one row
    finished: its window runs into the RoPE table's zero-padded tail), RoPE at the query positions -- gives the same
    output and cache writes on every CPU face as the fp64 reference."""
    import mirai_kernels as mk
    from mirai_kernels import backend as B

    faces = [f for f in ("cpp", "triton") if f in B.available_faces("decode_attention", torch.device("cpu"))]
    if not faces:
        pytest.skip("no C++ or Triton decode face here")
    torch.manual_seed(0)
    window, rows, heads, head_dim = 16, 3, 2, 16
    max_seqlen = 1 + 64 + window
    q = torch.randn(rows, window, heads, head_dim)
    k_cache, v_cache = torch.randn(rows, max_seqlen, heads, head_dim), torch.randn(rows, max_seqlen, heads, head_dim)
    k_new, v_new = torch.randn(rows, window, heads, head_dim), torch.randn(rows, window, heads, head_dim)
    seqlens = torch.tensor([1, 30, 64], dtype=torch.int32)  # just prefilled, mid-image, last token committed
    table = mk.rope_2d_table((8, 8), head_dim, 1)
    table = torch.cat([table, table.new_zeros(max_seqlen - table.shape[0], *table.shape[1:])])

    def call(face, dtype):
        kc, vc = k_cache.to(dtype), v_cache.to(dtype)
        out = mk.decode_attention(q.to(dtype), kc, vc, k_new.to(dtype), v_new.to(dtype), cache_seqlens=seqlens,
                                  rope_table=table, backend=face)
        return out, kc, vc

    ref = call("reference", torch.float64)
    for face in faces:
        for got, want in zip(call(face, torch.float32), ref):
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


def test_sample_cli_speculative_on_the_shipped_checkpoint(tmp_path):
    """`models.sample --speculative jacobi` samples the shipped model with the structure plain sampling reaches,
    and `--window` below 2 is refused at parse time, naming the flag."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ckpt = os.path.join(root, "models", "pretrained", "shapes8-micro", "model.pt")
    run = subprocess.run([sys.executable, "-m", "models.sample", "--ckpt", ckpt, "--out", str(tmp_path / "s.png"),
                          "--speculative", "jacobi", "--window", "8"], cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    line = next(l for l in run.stdout.splitlines() if l.startswith("structure:"))
    ok, n = map(int, line.split()[1].split("/"))
    assert n == 40 and ok >= 20, line  # plain sampling: 28/40 (tests/test_pretrained.py)
    bad = subprocess.run([sys.executable, "-m", "models.sample", "--ckpt", ckpt, "--speculative", "jacobi",
                          "--window", "1"], cwd=root, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--window" in bad.stderr


def test_decode_bench_e2e_speculative_provider(tmp_path):
    """decode_bench --e2e-windows: the speculative provider runs beside the plain sampler and reports its calls
    (per image at most H*W, at least H*W / window; the batch's calls at least the slowest image's)."""
    import json
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import decode_bench

    out = tmp_path / "e2e.json"
    decode_bench.main(["--no-kernels", "--no-e2e-eager", "--e2e-grid", "3", "--e2e-batch", "2", "--e2e-windows", "4",
                       "--threads", "1", "--min-run-time", "0.01", "--json", str(out)])
    (row,) = json.loads(out.read_text())["results"]
    spec = row["providers"]["mirai_jacobi_w4"]
    assert "ms" in row["providers"]["mirai_sampler"] and "ms" in spec, row
    assert 9 / 4 <= spec["calls_per_image_mean"] <= 9 and spec["batch_calls"] >= spec["calls_per_image_max"]
    assert spec["fewer_calls_per_image"] == pytest.approx(9 / spec["calls_per_image_mean"])
