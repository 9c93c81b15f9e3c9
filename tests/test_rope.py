"""2D RoPE: every face against an fp64 reference, LlamaGen's convention, opcheck, compile, errors, backends."""

import math

import pytest
import torch
from torch.library import opcheck

import mirai_kernels as mk
from mirai_kernels import backend as B
from mirai_kernels.ops import face_op
from mirai_kernels.reference import rope as ref

from .tolerances import assert_close_fa

CPU = torch.device("cpu")
FACES = [f for f in ("reference", "cpp", "triton") if f in B.available_faces("apply_rope_2d", CPU)]


def llamagen_table_fp64(height, width, head_dim, prefix, base=10000.0):
    """The table written from the convention's definition, cell by cell, in fp64."""
    quarter = head_dim // 4
    table = torch.zeros(prefix + height * width, head_dim // 2, 2, dtype=torch.float64)
    for r in range(height):
        for c in range(width):
            for i in range(head_dim // 2):
                pos = r if i < quarter else c
                angle = pos * base ** (-2 * (i % quarter) / (head_dim // 2))
                table[prefix + r * width + c, i] = torch.tensor([math.cos(angle), math.sin(angle)])
    return table


def rotate_complex_fp64(x, rows):
    """Rotation as complex multiplication of consecutive pairs, in fp64. rows: (1|B, S, D/2, 2)."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    w = torch.view_as_complex(rows.double().contiguous())[:, :, None, :]
    return torch.view_as_real(z * w).flatten(-2)


def run_face(face, x, table, positions=None):
    return mk.apply_rope_2d(x, table, positions, backend=face)


@pytest.mark.parametrize("grid,head_dim,prefix", [((16, 16), 64, 1), ((24, 24), 64, 1), ((3, 5), 16, 2), (4, 8, 0)])
def test_table_matches_llamagen_convention(grid, head_dim, prefix):
    table = mk.rope_2d_table(grid, head_dim, prefix)
    height, width = (grid, grid) if isinstance(grid, int) else grid
    assert table.dtype == torch.float32 and table.shape == (prefix + height * width, head_dim // 2, 2)
    assert table.is_contiguous()
    assert torch.count_nonzero(table[:prefix]) == 0, "prefix (class-token) rows must be zero"
    # fp32 angles up to ~24 rad: cos/sin of an fp32-rounded angle are off by <= |angle| * 2^-24.
    torch.testing.assert_close(table.double(), llamagen_table_fp64(height, width, head_dim, prefix), atol=3e-6, rtol=0)


def test_table_first_quarter_follows_rows_second_quarter_columns():
    table = mk.rope_2d_table((4, 6), 8, prefix=1)
    cell = lambda r, c: table[1 + r * 6 + c]  # noqa: E731
    assert torch.equal(cell(2, 0)[:2], cell(2, 5)[:2])  # row pairs ignore the column
    assert torch.equal(cell(0, 3)[2:], cell(3, 3)[2:])  # column pairs ignore the row
    assert not torch.equal(cell(1, 0)[:2], cell(0, 0)[:2])


SHAPES = [
    # (batch, grid, prefix, nheads, head_dim, seqlen)  seqlen = prefix + H*W (- 1 in training)
    (3, (16, 16), 1, 5, 64, 256),
    (1, (24, 24), 1, 3, 64, 577),
    (2, (3, 5), 1, 3, 32, 16),
    (1, (4, 4), 1, 1, 128, 1),
    (2, (4, 4), 1, 1, 16, 17),
]


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-S{s[5]}-H{s[3]}-D{s[4]}")
def test_forward_and_grad_match_fp64(face, dtype, shape):
    if face == "triton" and dtype in (torch.bfloat16, torch.float64):
        pytest.skip("interpreted Triton computes bf16 wrongly; the triton face takes no fp64")
    batch, grid, prefix, nheads, head_dim, seqlen = shape
    if face == "triton" and batch * nheads * seqlen > 1200:
        pytest.skip("keep interpreted Triton small")
    table = mk.rope_2d_table(grid, head_dim, prefix)
    # x as the k slice of a fused qkv projection: a strided view with a unit last-dim stride.
    qkv = torch.randn(batch, seqlen, 3, nheads, head_dim, dtype=dtype)
    x = qkv[:, :, 1].requires_grad_(True)
    out = run_face(face, x, table)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()

    x64 = x.detach().double().requires_grad_(True)
    out64 = rotate_complex_fp64(x64, table[:seqlen][None])
    out_pt = ref.apply_rope_2d(x.detach(), table)  # plain PyTorch at the face's precision
    assert_close_fa(out, out64, out_pt)
    assert torch.count_nonzero(out[:, :prefix].float()) == 0, "class-token rows rotate to zero"

    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    (gx64,) = torch.autograd.grad(out64, x64, grad.double())
    gx_pt = ref.apply_rope_2d(grad, table, conjugate=True)
    assert_close_fa(gx, gx64, gx_pt, factor=3.0, name="grad_x")


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("per_batch", [False, True])
def test_positions_select_table_rows(face, per_batch):
    batch, nheads, head_dim = 3, 2, 32
    table = mk.rope_2d_table((5, 7), head_dim)
    x = torch.randn(batch, 4, nheads, head_dim)
    if per_batch:  # decode: each sequence at its own position
        positions = torch.tensor([[0, 3, 35, 9], [1, 2, 3, 4], [30, 20, 10, 0]], dtype=torch.int32)
        rows = table[positions.long()]
    else:
        positions = torch.tensor([7, 1, 35, 0], dtype=torch.int32)
        rows = table[positions.long()][None]
    out = run_face(face, x, table, positions)
    torch.testing.assert_close(out.double(), rotate_complex_fp64(x, rows), atol=1e-5, rtol=1e-5)
    default = run_face(face, x, table, torch.arange(4, dtype=torch.int32))
    torch.testing.assert_close(default, run_face(face, x, table))


@pytest.mark.parametrize("face", [f for f in FACES if f != "reference"])
def test_opcheck(face):
    table = mk.rope_2d_table((4, 4), 16)
    x = torch.randn(2, 17, 3, 16, requires_grad=True)
    op = face_op("apply_rope_2d", face)
    opcheck(op, (x, table, None, False))
    opcheck(op, (x[:, :5], table, torch.tensor([[0, 4, 9, 16, 2], [1, 1, 1, 1, 1]], dtype=torch.int32), True))


@pytest.mark.skipif(not B.cpp_available(), reason="C++ extension not built")
def test_double_backward_cpp():
    table = mk.rope_2d_table((3, 3), 8)
    x = torch.randn(2, 10, 2, 8, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda t: mk.apply_rope_2d(t, table, backend="cpp"), (x,))


@pytest.mark.parametrize("face", FACES)
def test_compile_fullgraph(face):
    table = mk.rope_2d_table((4, 4), 16)
    x = torch.randn(2, 17, 2, 16, requires_grad=True)

    def loss(t):
        return mk.apply_rope_2d(t * 2, table, backend=face).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    (g_compiled,) = torch.autograd.grad(compiled(x), x)
    (g_eager,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(g_compiled, g_eager)


@pytest.mark.parametrize("face", FACES)
def test_autocast_keeps_input_dtype(face):
    table = mk.rope_2d_table((4, 4), 16)
    x32 = torch.randn(1, 17, 2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = run_face(face, x32, table)
        out16 = run_face(face, x32.half(), table)
    assert out32.dtype == torch.float32 and out16.dtype == torch.float16
    torch.testing.assert_close(out32, run_face(face, x32, table))


def test_rope_module():
    module = mk.Rope2D((4, 4), 16)
    assert "table" not in module.state_dict()
    x = torch.randn(2, 17, 2, 16)
    torch.testing.assert_close(module(x), mk.apply_rope_2d(x, module.table))


# ---------------------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------------------

TABLE = mk.rope_2d_table((4, 4), 16)


@pytest.mark.parametrize(
    "make,error,match",
    [
        (lambda: (torch.randn(17, 2, 16), TABLE, None), ValueError, "4-D"),
        (lambda: (torch.randn(1, 17, 2, 16, dtype=torch.float64).to(torch.int64), TABLE, None), TypeError, "float16"),
        (lambda: (torch.randn(1, 17, 2, 18), TABLE, None), ValueError, r"head_dim/2 = 9"),
        (lambda: (torch.randn(1, 17, 2, 15), TABLE, None), ValueError, "even"),
        (lambda: (torch.randn(1, 17, 16, 2).transpose(2, 3), TABLE, None), ValueError, "unit stride"),
        (lambda: (torch.randn(1, 18, 2, 16), TABLE, None), ValueError, "exceeds the table"),
        (lambda: (torch.randn(1, 17, 2, 16), TABLE.double(), None), TypeError, "float32"),
        (lambda: (torch.randn(1, 17, 2, 16), TABLE.to("meta"), None), ValueError, "meta"),
        (lambda: (torch.randn(1, 3, 2, 16), TABLE, torch.zeros(3, dtype=torch.int64)), TypeError, "int32"),
        (lambda: (torch.randn(1, 3, 2, 16), TABLE, torch.zeros(4, dtype=torch.int32)), ValueError, r"\(seqlen,\)"),
        (lambda: (torch.randn(1, 3, 2, 16), TABLE, torch.tensor([0, 5, 17], dtype=torch.int32)), IndexError, r"\[0, 17\)"),
        (lambda: (torch.randn(1, 3, 2, 16), TABLE, torch.tensor([0, -1, 2], dtype=torch.int32)), IndexError, "lie in"),
    ],
)
@pytest.mark.parametrize("face", FACES)
def test_bad_inputs_raise_clear_errors(make, error, match, face):
    x, table, positions = make()
    with pytest.raises(error, match=match):
        mk.apply_rope_2d(x, table, positions, backend=face)


@pytest.mark.skipif(not B.cpp_available(), reason="C++ extension not built")
def test_raw_cpp_op_checks_its_inputs():
    with pytest.raises(RuntimeError, match="lie in"):
        torch.ops.mirai.apply_rope_2d(torch.randn(1, 2, 1, 16), TABLE, torch.tensor([0, 99], dtype=torch.int32), False)
    with pytest.raises(RuntimeError, match="unit last-dim stride"):
        torch.ops.mirai.apply_rope_2d(torch.randn(1, 2, 16, 2).transpose(2, 3), TABLE, None, False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(grid=(4, 0), head_dim=16), "grid"),
    (dict(grid=4, head_dim=18), "multiple of 4"),
    (dict(grid=4, head_dim=16, prefix=-1), "prefix"),
])
def test_table_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mk.rope_2d_table(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# Backends and the extensions
# ---------------------------------------------------------------------------------------------------------


def test_cpp_extension_registers_ops():
    assert B.cpp_available(), f"mirai_kernels._C failed to import: {B._extension_error('mirai_kernels._C')}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mirai::apply_rope_2d", "CPU")
    assert hasattr(torch.ops.mirai, "apply_rope_2d_triton")


@pytest.mark.skipif(not B.cuda_ext_available(), reason="CUDA extension not built")
def test_cuda_extension_registers_ops():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("mirai::apply_rope_2d", "CUDA")


def test_auto_picks_cpp_on_cpu_and_never_interpreted_triton(monkeypatch):
    assert B.auto_face("apply_rope_2d", CPU) == "cpp"
    monkeypatch.setattr(B, "_EXTENSION_ERRORS", {**B._EXTENSION_ERRORS, "mirai_kernels._C": "ImportError: gone"})
    assert B.auto_face("apply_rope_2d", CPU) == "reference"
    with pytest.raises(B.BackendUnavailableError, match="not built"):
        mk.apply_rope_2d(torch.randn(1, 2, 1, 16), TABLE, backend="cpp")


def test_auto_on_gpu_only_picks_faces_validated_on_a_gpu(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as on a GPU machine
    monkeypatch.setattr(B, "GPU_VALIDATED", {})
    assert B.auto_face("apply_rope_2d", cuda) == "reference"
    monkeypatch.setattr(B, "GPU_VALIDATED", {("apply_rope_2d", "triton"): "benchmarks/results/x.json"})
    assert B.auto_face("apply_rope_2d", cuda) == ("triton" if B.triton_available() else "reference")


def test_gpu_validation_record_points_at_committed_results():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    for (op, face), path in B.GPU_VALIDATED.items():
        assert face in ("triton", "cuda") and (root / path).is_file(), (op, face, path)


def test_backend_precedence(monkeypatch):
    x = torch.randn(1, 2, 1, 16)
    monkeypatch.setenv("MIRAI_BACKEND", "reference")
    assert B.get_backend() == "reference"
    try:
        mk.set_backend("cpp")
        assert B.get_backend() == "cpp"
        with mk.use_backend("auto"):
            assert B.get_backend() == "auto"
            with pytest.raises(B.BackendUnavailableError, match="CUDA tensors"):
                mk.apply_rope_2d(x, TABLE, backend="cuda")
        assert B.get_backend() == "cpp"
    finally:
        mk.set_backend(None)
    assert B.get_backend() == "reference"
    with pytest.raises(ValueError, match="unknown backend"):
        mk.apply_rope_2d(x, TABLE, backend="fast")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(B.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        mk.apply_rope_2d(torch.randn(1, 2, 1, 16), TABLE, backend="triton")


# ---------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("face", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"B{s[0]}-S{s[5]}-H{s[3]}-D{s[4]}")
def test_gpu_faces_match_fp64(face, dtype, shape):
    batch, grid, prefix, nheads, head_dim, seqlen = shape
    table = mk.rope_2d_table(grid, head_dim, prefix, device="cuda")
    qkv = torch.randn(batch, seqlen, 3, nheads, head_dim, dtype=dtype, device="cuda")
    x = qkv[:, :, 2].requires_grad_(True)
    out = mk.apply_rope_2d(x, table, backend=face)
    out64 = rotate_complex_fp64(x.detach().cpu(), table[:seqlen][None].cpu())
    assert_close_fa(out.cpu(), out64, ref.apply_rope_2d(x.detach(), table).cpu())
    grad = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, x, grad)
    assert_close_fa(gx.cpu(), rotate_complex_fp64(grad.cpu(), table[:seqlen][None].cpu().clone().mul_(
        torch.tensor([1.0, -1.0]))), ref.apply_rope_2d(grad, table, conjugate=True).cpu(), factor=3.0)
    positions = torch.randint(0, table.shape[0], (batch, seqlen), dtype=torch.int32, device="cuda")
    torch.testing.assert_close(mk.apply_rope_2d(x, table, positions, backend=face),
                               ref.apply_rope_2d(x, table, positions), atol=2e-2, rtol=2e-2)
    opcheck(face_op("apply_rope_2d", face), (x, table, positions, False))


# ---------------------------------------------------------------------------------------------------------
# Non-finite and empty inputs, interpreted bf16 (README, "Guarantees")
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("face", FACES)
def test_non_finite_inputs_propagate_as_plain_pytorch_maths(face):
    """NaN/Inf reach exactly the outputs plain PyTorch's rotation gives them (Inf times a zero class-token row is
    NaN, as in LlamaGen's apply_rotary_emb)."""
    table = mk.rope_2d_table(3, 8)
    x = torch.randn(2, 6, 2, 8)
    x[0, 0, 0, 1] = float("inf")  # class-token row: cos = sin = 0
    x[0, 3, 1, 2] = float("nan")
    x[1, 4, 0, 6] = float("-inf")
    out = mk.apply_rope_2d(x, table, backend=face)
    pairs = x.double().unflatten(-1, (-1, 2))
    rows = table[:6].double()[None, :, None]
    cos, sin = rows[..., 0], rows[..., 1]
    plain = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin],
                        -1).flatten(-2)
    assert torch.equal(out.isnan(), plain.isnan()) and plain.isnan().any()
    assert torch.equal(out.isinf(), plain.isinf())
    finite = plain.isfinite()
    torch.testing.assert_close(out.double()[finite], plain[finite], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("face", FACES)
@pytest.mark.parametrize("shape", [(0, 4, 2, 8), (2, 0, 2, 8), (2, 4, 0, 8)])
def test_empty_inputs_give_empty_outputs_and_grads(face, shape):
    x = torch.randn(shape, requires_grad=True)
    out = mk.apply_rope_2d(x, mk.rope_2d_table(2, 8), backend=face)
    assert out.shape == x.shape
    (g,) = torch.autograd.grad(out.sum(), x)
    assert g.shape == x.shape


def test_interpreted_triton_refuses_bfloat16():
    if "triton" not in FACES or not B.triton_interpreted():
        pytest.skip("needs the interpreted Triton face")
    with pytest.raises(TypeError, match="bfloat16 on the interpreted Triton face"):
        mk.apply_rope_2d(torch.randn(1, 4, 2, 8, dtype=torch.bfloat16), mk.rope_2d_table(2, 8), backend="triton")
