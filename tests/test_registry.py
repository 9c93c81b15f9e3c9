"""The op registry (one declaration per op), the shared door checks and the bounded pairing cache."""

import pytest
import torch
from torch.library import opcheck

import mirai_kernels as mk
from mirai_kernels import backend as B
from mirai_kernels.ops import _checks, _pairing, _registry, face_op
from mirai_kernels.reference import foresight as ref_foresight

CPU = torch.device("cpu")


def _toy_triton(x, factor):
    return x * factor  # stands in for a Triton launcher: the registry does not care what the backend runs


def _toy_fake(x, factor):
    return x.new_empty(x.shape)


def _toy_autograd(ops):
    scale = ops[""]

    def setup_context(ctx, inputs, output):
        ctx.factor = inputs[1]

    def backward(ctx, grad):
        return scale(grad, ctx.factor), None

    return backward, setup_context


# A fifth op, declared the way every door declares its op: nothing else is written for it.
TOY = _registry.declare(
    "test_registry_toy_scale",
    faces=("reference", "triton", "cpp"),
    fp64_faces=("reference",),
    stages={"": _registry.Stage("(Tensor x, float factor) -> Tensor", triton=_toy_triton, fake=_toy_fake,
                                autograd=_toy_autograd)},
)


def test_a_declared_op_gets_its_ops_fake_autograd_and_dispatch():
    assert TOY.op_name("triton") == "test_registry_toy_scale_triton"
    assert TOY.op_name("cpp") == "test_registry_toy_scale"  # the compiled backends share one op, per device
    assert B.op_faces(TOY.name) == ("reference", "triton", "cpp")
    x = torch.randn(3, 4, requires_grad=True)
    opcheck(face_op(TOY.name, "triton"), (x, 2.5))
    (g,) = torch.autograd.grad(TOY.op("triton")(x, 2.5).sum(), x)  # the declared autograd formula
    assert torch.equal(g, torch.full_like(x, 2.5))
    if "triton" in B.available_faces(TOY.name, CPU):
        assert TOY.select(CPU, "triton", torch.float32, x) == "triton"
        assert TOY.select(CPU, "triton", torch.float32, x[:0]) == "reference"  # empty input: no launch
        with pytest.raises(TypeError, match="backend='triton' computes in fp32 and does not take float64"):
            TOY.select(CPU, "triton", torch.float64, x.double())


def test_a_compiled_backend_without_its_kernel_is_unavailable_with_the_reason():
    # The extension is built, but it has no kernel for this op (an extension built from older sources): the
    # backend is refused by name with the reason, and auto does not pick it.
    if not B.cpp_available():
        pytest.skip("C++ extension not built")
    reason = B.face_unavailable_reason(TOY.name, "cpp", CPU)
    assert reason is not None and "no CPU kernel for mirai::test_registry_toy_scale" in reason
    with pytest.raises(B.BackendUnavailableError, match="no CPU kernel"):
        TOY.select(CPU, "cpp", torch.float32, torch.ones(1))
    assert B.auto_face(TOY.name, CPU) == "reference"
    assert "mirai::test_registry_toy_scale (CPU)" in _registry.missing_kernels()


def test_every_shipped_op_has_its_kernels():
    shipped = {name: op for name, op in _registry.declared().items() if not name.startswith("test_")}
    assert set(shipped) == {"apply_rope_2d", "dual_attention", "decode_attention", "foresight_cosine_loss",
                            "fused_linear_cosine_loss", "foresight_heads"}
    if not B.cpp_available():
        pytest.skip("C++ extension not built")
    missing = [m for m in _registry.missing_kernels() if "test_registry" not in m and "(CUDA)" not in m]
    assert not missing


def test_declaring_an_op_twice_is_refused():
    with pytest.raises(ValueError, match="declared twice"):
        _registry.declare(TOY.name, faces=("reference",), fp64_faces=("reference",), stages={})


def test_rope_and_decode_refuse_a_bad_table_with_one_wording():
    x = torch.randn(1, 3, 2, 16)
    table = mk.rope_2d_table(4, 16)
    cache = torch.zeros(1, 8, 2, 16)
    seqlens = torch.zeros(1, dtype=torch.int32)
    for bad, error, message in ((table.double(), TypeError, "must be float32"),
                                (table[:, :4], ValueError, r"must be \(rows, head_dim/2 = 8, 2\) as built by"),
                                (table.to("meta"), ValueError, "is on meta but")):
        with pytest.raises(error, match="apply_rope_2d: table " + message):
            mk.apply_rope_2d(x, bad)
        with torch.no_grad(), pytest.raises(error, match="decode_attention: rope_table " + message):
            mk.decode_attention(x, cache, cache.clone(), x, x, cache_seqlens=seqlens, rope_table=bad)


def test_unit_stride_check_is_shared():
    t = torch.randn(2, 3, 8)[..., ::2]
    with pytest.raises(ValueError, match="where: t must have a unit stride in its last dim"):
        _checks.check_unit_stride("where", "t", t)
    _checks.check_unit_stride("where", "t", t[:0])  # nothing is read: any stride


def test_pairing_cache_is_bounded_and_hits_return_the_same_table(monkeypatch):
    monkeypatch.setattr(_pairing, "MAX_ENTRIES", 4)
    _pairing.clear()
    grid = (4, 4)
    parsed = ref_foresight.parse_offsets([0, 1], grid)
    first = _pairing.pairing_table(15, grid, parsed, 1, "raster", True, None)
    assert _pairing.pairing_table(15, grid, parsed, 1, "raster", True, "cpu") is first  # a hit: no rebuild
    for seqlen in range(2, 12):
        _pairing.pairing_table(seqlen, grid, parsed, 1, "raster", True, None)
    assert len(_pairing._CACHE) == 4  # the oldest entries went
    again = _pairing.pairing_table(15, grid, parsed, 1, "raster", True, None)
    assert again is not first and torch.equal(again, first)
    _pairing.clear()
