"""Build mirai_kernels: the C++ CPU extension ``mirai_kernels._C`` always, the CUDA extension
``mirai_kernels._C_cuda`` when CUDA is usable or forced.

    pip install --no-build-isolation -e .          # the documented install (isolation would hide your torch)

Environment:
    MIRAI_CUDA=auto|0|1   auto (default): build the CUDA sources when a GPU is visible and a CUDA toolkit is found;
                          1: always (compile-only on a machine without a GPU, as CI does); 0: never.
    CUDA_HOME             defaults to /usr/local/cuda when it exists (torch's own guess can pick a wrapper script).
    TORCH_CUDA_ARCH_LIST  defaults to 9.0 (H100) when no GPU is visible (torch cannot detect one and fails without it).
    MAX_JOBS              parallel compile jobs, default 2.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

try:
    import torch
except ImportError:
    sys.exit(
        "mirai_kernels compiles C++/CUDA extensions against the torch you have installed, and torch is not "
        "importable here.\nInstall it first (e.g. `pip install torch==2.14.1`), then build with "
        "`pip install --no-build-isolation -e .` (build isolation would hide that torch)."
    )

# torch.utils.cpp_extension reads CUDA_HOME when it is imported, so set the defaults first.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
os.environ.setdefault("MAX_JOBS", "2")

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))

# The tested range (README, "Supported versions"): torch 2.11 (Python 3.12, CUDA 13.0, Triton 3.6: the GPU
# machines' stack, checked by benchmarks/gpu_preflight.sh) through torch 2.14 (Python 3.11, Triton 3.8: development
# and CI). install_requires states only the lower bounds, so pip never swaps out a newer torch the extensions
# were just compiled against; outside the range the build warns.
TORCH_RANGE = ((2, 11), (2, 14))
TRITON_MIN = "3.6"


def _check_torch_range() -> None:
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    low, high = TORCH_RANGE
    if not low <= version <= high:
        print(f"warning: mirai_kernels is tested with torch {low[0]}.{low[1]} to {high[0]}.{high[1]}, building "
              f"against torch {torch.__version__}", file=sys.stderr)


def _want_cuda() -> bool:
    mode = os.environ.get("MIRAI_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"MIRAI_CUDA must be auto, 0 or 1, got {mode!r}")
    if mode == "0":
        return False
    toolkit = CUDA_HOME is not None and torch.version.cuda is not None
    if mode == "1":
        if not toolkit:
            sys.exit(
                "MIRAI_CUDA=1 but no CUDA build is possible: "
                + ("torch is a CPU-only build" if torch.version.cuda is None else "no CUDA toolkit (set CUDA_HOME)")
            )
        return True
    return toolkit and torch.cuda.is_available()


def _relative(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def extensions():
    cxx_flags = ["-O3", "-fopenmp"]  # torch adds its own -std flag
    exts = [
        CppExtension(
            "mirai_kernels._C",
            _relative(glob.glob(os.path.join(ROOT, "csrc", "*.cpp"))),
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]
    if _want_cuda():
        if not torch.cuda.is_available():
            # No GPU to detect the arch from (and torch fails without a list): compile for the H100.
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        cuda_sources = glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(
            os.path.join(ROOT, "csrc", "cuda", "*.cpp")
        )
        exts.append(
            CUDAExtension(
                "mirai_kernels._C_cuda",
                _relative(cuda_sources),
                extra_compile_args={
                    "cxx": ["-O3"],
                    "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"],
                },
            )
        )
    return exts


_check_torch_range()

setup(
    name="mirai_kernels",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for training and sampling AR image generators with foresight",
    packages=find_packages(include=["mirai_kernels", "mirai_kernels.*", "models", "models.*"]),
    python_requires=">=3.10",
    install_requires=[f"torch>={TORCH_RANGE[0][0]}.{TORCH_RANGE[0][1]}", f"triton>={TRITON_MIN}; platform_system == 'Linux'",
                      "numpy", "tqdm"],
    extras_require={
        # torchvision pinned to the build matching torch 2.14.1, or pip may pull a newer torch with it.
        "eval": ["torch-fidelity==0.4.0", "torchvision==0.29.1", "scikit-learn", "matplotlib"],
        "test": ["pytest", "pytest-timeout"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
