"""Compile every Triton kernel configuration the package ships for sm_90 (H100) ahead of time, without a GPU.

    python -m mirai_kernels.triton.aot_check [--arch 90] [--json out.json]

Each module in ``mirai_kernels/triton`` that defines ``aot_specs()`` lists its launch configurations (see
``triton/rope.py``). Every one is compiled to a cubin with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
and its shared-memory use is reported; the check fails when a compile fails or a config needs more shared memory
than the target has (228 KiB per SM on an H100, 227 KiB usable per block). Must run with ``TRITON_INTERPRET``
unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import time

SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def iter_specs():
    import mirai_kernels.triton as package

    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.name == "aot_check":
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if hasattr(module, "aot_specs"):
            for spec in module.aot_specs():
                yield info.name, spec


def compile_spec(spec: dict, arch: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = spec["fn"]
    constexprs = dict(spec.get("constexprs", {}))
    signature = dict(spec["signature"])
    for name in constexprs:
        signature[name] = "constexpr"
    # ASTSource keys constexprs by argument index tuples.
    arg_index = {name: i for i, name in enumerate(fn.arg_names)}
    unknown = (set(signature) | set(constexprs)) - set(arg_index)
    if unknown:
        raise ValueError(f"spec {spec['name']}: names not in the kernel's arguments: {sorted(unknown)}")
    missing = set(arg_index) - set(signature)
    if missing:
        raise ValueError(f"spec {spec['name']}: kernel arguments missing from the spec: {sorted(missing)}")
    src = ASTSource(
        fn=fn,
        signature={name: signature[name] for name in fn.arg_names},
        constexprs={(arg_index[name],): value for name, value in constexprs.items()},
    )
    options = {"num_warps": spec.get("num_warps", 4), "num_stages": spec.get("num_stages", 3)}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an int (default 90: H100)")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    limit = SHARED_MEMORY_LIMIT.get(args.arch, 99 * 1024)
    rows, failures = [], 0
    for module, spec in iter_specs():
        start = time.perf_counter()
        row = {"module": module, "name": spec["name"], "num_warps": spec.get("num_warps", 4),
               "num_stages": spec.get("num_stages", 3)}
        try:
            kernel = compile_spec(spec, args.arch)
            row["shared_bytes"] = int(kernel.metadata.shared)
            row["ok"] = row["shared_bytes"] <= limit
            if not row["ok"]:
                row["error"] = f"needs {row['shared_bytes']} B of shared memory > {limit} B on sm_{args.arch}"
        except Exception as exc:  # report every failing config, not just the first
            row["ok"], row["error"] = False, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
        row["seconds"] = round(time.perf_counter() - start, 2)
        failures += not row["ok"]
        status = "ok  " if row["ok"] else "FAIL"
        detail = f"smem {row['shared_bytes']:>7} B" if "shared_bytes" in row else ""
        print(f"{status} sm_{args.arch} {module:<16} {row['name']:<60} {detail} {row.get('error', '')}", flush=True)
        rows.append(row)
    print(f"{len(rows) - failures} compiled, {failures} failed (shared-memory limit {limit} B)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"arch": args.arch, "limit_bytes": limit, "configs": rows}, f, indent=1)
    if not rows:
        print("no Triton kernel configurations found", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
