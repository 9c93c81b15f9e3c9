"""Validate this package's fast backends on *your* device, so that ``auto`` uses them here.

    python -m mirai_kernels.selftest                 # on the first CUDA device: every triton/cuda backend
    python -m mirai_kernels.selftest --device cpu    # the C++ backends (and interpreted Triton, TRITON_INTERPRET=1)
    python -m mirai_kernels.selftest --help

Every fast backend of every op runs against the plain-PyTorch reference on a few LlamaGen shapes (GPT-B heads,
16x16 and 24x24 grids, Mirai-E's foresight offsets) and dtypes, forward and backward: the backend's error against the
reference evaluated in float64 (on the same rounded inputs) must stay within ``4 x`` the reference's own error at
the backend's dtype plus a per-dtype floor scaled by the output's magnitude. A table is printed; the verdict of each
op/backend (pass if every case passed, fail otherwise) is recorded for this device kind (its compute capability,
``sm_90``), together with the torch, Triton and mirai_kernels versions, in the user cache file
(``$MIRAI_SELFTEST_CACHE``, else ``$XDG_CACHE_HOME/mirai_kernels/selftest.json``, else
``~/.cache/mirai_kernels/selftest.json``). From then on ``backend="auto"`` picks the passing backends on this kind
of device and never the failing ones (see :mod:`mirai_kernels.backend`); after a torch, Triton or mirai_kernels
upgrade the record is stale and ignored until the selftest runs again.

Exit status: 0 every backend passed and the record was written; 1 a backend failed (recorded as failing); 2 the
device cannot be used; 3 the cache file could not be written (nothing recorded; the table is still printed).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Callable


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m mirai_kernels.selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda when a GPU is visible, else an error naming --device cpu)")
    parser.add_argument("--cache", default=None, help="record file (default: see above)")
    parser.add_argument("--no-record", action="store_true", help="print the table, record nothing")
    parser.add_argument("--json", default=None, help="also write the table and verdicts here")
    parser.add_argument("--ops", nargs="+", default=None, help="only these ops (default: all)")
    parser.add_argument("--faces", nargs="+", default=None, help="only these faces (default: every fast face)")
    return parser.parse_args(argv)


# Per-dtype error floor, relative to the largest |value| of the float64 result: one rounding of the output plus
# the low-precision products of the fast backends (bf16 P @ V), with margin; garbage, NaN or a wrong mask is far off.
FLOOR = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 6e-2, "float64": 1e-9}
FACTOR = 4.0


@dataclasses.dataclass
class Case:
    op: str
    label: str
    dtype: "torch.dtype"  # noqa: F821
    make: Callable  # (device, dtype) -> (inputs: dict of tensors, static kwargs)
    grad_inputs: tuple  # names of the inputs gradients are checked for ()


def _randn(*shape, scale=1.0):
    import torch

    # Drawn on the CPU in fp32 from a seeded generator, so every device sees the same values.
    return torch.randn(*shape, generator=_GEN, dtype=torch.float32) * scale


_GEN = None


def _cases(device_type: str) -> list[Case]:
    import torch

    import mirai_kernels as mk

    small = device_type == "cpu"  # the interpreter and 2-core CI machines: tiny shapes
    gpu_dtypes = (torch.bfloat16, torch.float16, torch.float32)
    cases = []

    # apply_rope_2d: GPT-B heads on the 16x16 training grid (class token first).
    grid, heads, hd, batch = ((4, 4), 2, 16, 1) if small else ((16, 16), 12, 64, 2)
    for dtype in (torch.float32,) if small else gpu_dtypes:
        def make(device, dtype, grid=grid, heads=heads, hd=hd, batch=batch):
            seqlen = 1 + grid[0] * grid[1]
            return {"x": _randn(batch, seqlen, heads, hd)}, {"table": mk.rope_2d_table(grid, hd, 1, device=device)}
        cases.append(Case("apply_rope_2d", f"B{batch} S{1 + grid[0] * grid[1]} H{heads} D{hd}", dtype, make, ("x",)))

    # dual_attention: both outputs and their gradients, GPT-B (S 256) and GPT-L heads on 24x24 (S 576).
    shapes = [(1, 40, 2, 16)] if small else [(2, 256, 12, 64), (1, 576, 16, 64)]
    for shape in shapes:
        for dtype in (torch.float32,) if small else ((torch.bfloat16, torch.float16) if shape[1] == 256
                                                      else (torch.bfloat16,)):
            def make(device, dtype, shape=shape):
                b, s, h, d = shape
                return {"q": _randn(b, s, h, d), "k": _randn(b, s, h, d), "v": _randn(b, s, h, d)}, {}
            cases.append(Case("dual_attention", "B{} S{} H{} D{}".format(*shape), dtype, make, ("q", "k", "v")))
    if not small:  # fp32 runs its own (small) kernel config: one short shape
        cases.append(Case("dual_attention", "B1 S100 H4 D64", torch.float32,
                          lambda device, dtype: ({"q": _randn(1, 100, 4, 64), "k": _randn(1, 100, 4, 64),
                                                  "v": _randn(1, 100, 4, 64)}, {}), ("q", "k", "v")))

    # foresight_cosine_loss / fused_linear_cosine_loss: Mirai-E's three offsets (same, right, below).
    g, z, hidden, b = (4, 16, 24, 2) if small else (16, 256, 512, 2)
    n = 1 + g * g - 1
    for dtype in (torch.float32,) if small else gpu_dtypes:
        def make_cos(device, dtype, g=g, z=z, b=b, n=n):
            return ({"proj": _randn(b, n, 3, z), "targets": _randn(b, n, z)},
                    {"offsets": [0, 1, g], "grid": (g, g)})
        cases.append(Case("foresight_cosine_loss", f"B{b} N{n} K3 Z{z}", dtype, make_cos, ("proj",)))

        def make_fused(device, dtype, g=g, z=z, b=b, n=n, hidden=hidden):
            return ({"x": _randn(b, n, 3, hidden), "weight": _randn(3, z, hidden, scale=hidden ** -0.5),
                     "bias": _randn(3, z, scale=0.1), "targets": _randn(b, n, z)},
                    {"offsets": [0, 1, g], "grid": (g, g), "input_activation": "silu"})
        cases.append(Case("fused_linear_cosine_loss", f"B{b} N{n} K3 hidden{hidden} Z{z} silu", dtype, make_fused,
                          ("x", "weight", "bias")))

    # decode_attention: one sampling step of GPT-B with RoPE, mixed cache lengths (inference only: no backward).
    b, h, hk, d, max_len = (2, 2, 1, 16, 24) if small else (8, 12, 12, 64, 577)
    for dtype in (torch.float32,) if small else gpu_dtypes:
        def make_dec(device, dtype, b=b, h=h, hk=hk, d=d, max_len=max_len):
            lens = torch.randint(0, max_len - 1, (b,), generator=_GEN, dtype=torch.int32)
            grid = 5 if small else 24  # the table must cover every cache row
            return ({"q": _randn(b, 1, h, d), "k_cache": _randn(b, max_len, hk, d), "v_cache": _randn(b, max_len, hk, d),
                     "k_new": _randn(b, 1, hk, d), "v_new": _randn(b, 1, hk, d)},
                    {"cache_seqlens": lens.to(device),
                     "rope_table": mk.rope_2d_table((grid, grid), d, 1, device=device)[:max_len]})
        cases.append(Case("decode_attention", f"B{b} Hq{h} Hkv{hk} D{d} cache{max_len} rope", dtype, make_dec, ()))
    return cases


def _call(op: str, inputs: dict, static: dict, backend: str):
    """Run ``op`` with ``backend``; returns its outputs as a flat list of tensors (graph-connected to ``inputs``)."""
    import mirai_kernels as mk

    if op == "apply_rope_2d":
        return [mk.apply_rope_2d(inputs["x"], static["table"], backend=backend)]
    if op == "dual_attention":
        return list(mk.dual_attention(inputs["q"], inputs["k"], inputs["v"], backend=backend))
    if op == "foresight_cosine_loss":
        total, per_head = mk.foresight_cosine_loss(inputs["proj"], inputs["targets"], static["offsets"],
                                                   grid=static["grid"], backend=backend)
        return [total, per_head]
    if op == "fused_linear_cosine_loss":
        total, per_head = mk.fused_linear_cosine_loss(inputs["x"], inputs["weight"], inputs["bias"], inputs["targets"],
                                                      static["offsets"], grid=static["grid"],
                                                      input_activation=static["input_activation"], backend=backend)
        return [total, per_head]
    if op == "decode_attention":
        # The caches are appended to in place: each call gets its own copies.
        return [mk.decode_attention(inputs["q"], inputs["k_cache"].clone(), inputs["v_cache"].clone(), inputs["k_new"],
                                    inputs["v_new"], cache_seqlens=static["cache_seqlens"],
                                    rope_table=static["rope_table"], backend=backend)]
    raise ValueError(f"unknown op {op}")


# Tests replace this to plant a broken backend; the selftest itself always calls through it.
CALL = _call


def _run(case: Case, inputs: dict, static: dict, backend: str, dtype):
    """Outputs and input gradients (upstream gradients seeded identically for every run) of one backend."""
    import torch

    leaves = {name: t.to(dtype).detach().requires_grad_(name in case.grad_inputs) for name, t in inputs.items()}
    outs = CALL(case.op, leaves, static, backend)
    grads = []
    if case.grad_inputs:
        gen = torch.Generator().manual_seed(1)
        upstream = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
        grads = torch.autograd.grad(outs, [leaves[n] for n in case.grad_inputs], upstream)
    return [o.detach() for o in outs], [g.detach() for g in grads]


def _err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(case: Case, face: str, device) -> dict:
    import torch

    global _GEN
    _GEN = torch.Generator().manual_seed(0)
    cpu_inputs, static = case.make(device, case.dtype)
    # Round the inputs to the dtype first: the float64 truth then sees exactly the backend's inputs.
    inputs = {name: t.to(device=device, dtype=case.dtype) for name, t in cpu_inputs.items()}
    row = {"op": case.op, "face": face, "case": case.label, "dtype": str(case.dtype).replace("torch.", "")}
    start = time.perf_counter()
    try:
        truth = _run(case, {k: v.double() for k, v in inputs.items()}, static, "reference", torch.float64)
        ref_lp = _run(case, inputs, static, "reference", case.dtype)
        got = _run(case, inputs, static, face, case.dtype)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # a crash is a failing backend, reported, not a crashed selftest
        row.update(verdict="fail", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        row["ms"] = round((time.perf_counter() - start) * 1e3, 1)
        return row
    row["ms"] = round((time.perf_counter() - start) * 1e3, 1)
    worst = {"fwd": 0.0, "bwd": 0.0}
    ok = True
    floor = FLOOR[row["dtype"]]
    for part, idx in (("fwd", 0), ("bwd", 1)):
        for t, r, p in zip(got[idx], truth[idx], ref_lp[idx]):
            if t.shape != r.shape or not torch.isfinite(t.double()).all():
                ok = False
                worst[part] = float("inf")
                continue
            bound = FACTOR * _err(p, r) + floor * max(1.0, r.abs().max().item() if r.numel() else 0.0)
            ratio = _err(t, r) / bound
            worst[part] = max(worst[part], ratio)
            ok &= ratio <= 1.0
    row.update(fwd_err_over_bound=float(f"{worst['fwd']:.3g}"),
               bwd_err_over_bound=float(f"{worst['bwd']:.3g}") if case.grad_inputs else None,
               verdict="pass" if ok else "fail")
    return row


def run(device, ops=None, faces=None) -> tuple[list[dict], dict[str, str], list[str]]:
    """Run the selftest on ``device``: (rows, {"op/face": "pass" | "fail"}, skipped "op/face: reason" lines)."""
    from . import backend as B

    rows, verdicts, skipped = [], {}, []
    for case in _cases(device.type):
        if ops and case.op not in ops:
            continue
        fast = [f for f in B.op_faces(case.op) if f != "reference"]
        # Only the backends that can run on this device type ("cuda" never runs CPU tensors, "cpp" never CUDA
        # ones).
        fast = [f for f in fast if (f in B.GPU_FACES) == (device.type == "cuda") or f == "triton"]
        for face in fast:
            if faces and face not in faces:
                continue
            reason = B.face_unavailable_reason(case.op, face, device)
            if reason is not None:
                line = f"{case.op}/{face}: {reason}"
                if line not in skipped:
                    skipped.append(line)
                continue
            row = _check(case, face, device)
            rows.append(row)
            key = f"{case.op}/{face}"
            verdicts[key] = "fail" if row["verdict"] == "fail" or verdicts.get(key) == "fail" else "pass"
    return rows, verdicts, skipped


def _print_table(rows, verdicts, skipped, header):
    print(header)
    fmt = "{:<26} {:<7} {:<36} {:<9} {:>9} {:>9} {:>9}  {}"
    print(fmt.format("op", "backend", "case", "dtype", "fwd err/b", "bwd err/b", "ms", "verdict"))
    for r in rows:
        bwd = "-" if r.get("bwd_err_over_bound") is None else f"{r['bwd_err_over_bound']:.2e}"
        fwd = "-" if "fwd_err_over_bound" not in r else f"{r['fwd_err_over_bound']:.2e}"
        verdict = r["verdict"].upper() if r["verdict"] == "fail" else r["verdict"]
        print(fmt.format(r["op"], r["face"], r["case"][:36], r["dtype"], fwd, bwd, r["ms"], verdict)
              + (f"  ({r['error']})" if "error" in r else ""))
    for line in skipped:
        print(f"skipped {line}")
    print("verdicts: " + (", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())) or "none (no fast backend ran)"))


def write_record(path: str, kind: str, record: dict) -> None:
    """Replace ``kind``'s record in the cache file (other device kinds' records are kept), atomically."""
    data = {"format": 1, "records": {}}
    try:
        with open(path) as f:
            old = json.load(f)
        if isinstance(old, dict) and isinstance(old.get("records"), dict):
            data["records"] = old["records"]
    except (OSError, ValueError):
        pass  # missing or unreadable: start afresh
    data["records"][kind] = record
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = _parse_args(argv)
    import torch

    from . import backend as B

    if args.device is None:
        if not torch.cuda.is_available():
            print("selftest: no CUDA device is visible. The selftest validates the GPU backends on your GPU; "
                  "`--device cpu` checks the C++ backends instead.", file=sys.stderr)
            return 2
        args.device = "cuda"
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print(f"selftest: --device {args.device} but torch sees no CUDA device", file=sys.stderr)
            return 2
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        # One compile per kernel variant (the first shipped config) keeps a cold run short; autotuning would
        # only choose between configs that are all compile-checked, not change what is validated.
        os.environ.setdefault("MIRAI_AUTOTUNE", "0")
    elif device.type != "cpu":
        print(f"selftest: device type {device.type} has no fast backends here", file=sys.stderr)
        return 2
    kind = B.device_kind(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    versions = B.software_versions()
    start = time.perf_counter()
    rows, verdicts, skipped = run(device, args.ops, args.faces)
    seconds = time.perf_counter() - start
    _print_table(rows, verdicts, skipped,
                 f"mirai_kernels selftest on {name} ({kind}); torch {versions['torch']}, triton {versions['triton']}, "
                 f"mirai_kernels {versions['mirai_kernels']}: {len(rows)} cases in {seconds:.1f} s")
    record = {"device": name, **versions,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seconds": round(seconds, 2), "faces": verdicts, "cases": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device_kind": kind, "skipped": skipped, **record}, f, indent=1)
    status = 1 if "fail" in verdicts.values() else 0
    if args.no_record:
        return status
    path = args.cache or B.selftest_cache_path()
    try:
        write_record(path, kind, record)
    except OSError as exc:
        print(f"selftest: could not write the record to {path} ({type(exc).__name__}: {exc}); nothing was recorded, "
              "so `auto` keeps its choices. Set MIRAI_SELFTEST_CACHE (or --cache) to a writable file.",
              file=sys.stderr)
        return 3
    B.reload_selftest_record()
    passing = [k for k, v in sorted(verdicts.items()) if v == "pass"]
    failing = [k for k, v in sorted(verdicts.items()) if v == "fail"]
    print(f"recorded for {kind} in {path}: passing {', '.join(passing) or 'none'}"
          + (f"; FAILING (auto never picks them here) {', '.join(failing)}" if failing else "")
          + (". `auto` now picks the passing backends on this device kind." if device.type == "cuda" else
             ". (On CPU `auto` picks the C++ backends unless they failed here; never interpreted Triton.)"))
    return status


if __name__ == "__main__":
    sys.exit(main())
