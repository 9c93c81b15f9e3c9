"""benchmarks/record_gpu_results.py: GPU_VALIDATED comes from committed suite results, never by hand."""

import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import record_gpu_results as R  # noqa: E402


def _summary(tests, *, kind="sm_90", date="2026-12-01T10:00:00+00:00", pytest_step=None):
    return {"format": 1, "suite": "benchmarks/gpu_suite.sh",
            "environment": {"device": "NVIDIA H200", "device_kind": kind, "date": date},
            "steps": [pytest_step or {"name": "pytest_gpu", "rc": 1, "timed_out": False}],
            "tests": [{"id": i, "outcome": o} for i, o in tests]}


def _write(results, name, summary):
    (results / name).mkdir(parents=True)
    (results / name / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def backend_copy(tmp_path):
    path = tmp_path / "backend.py"
    shutil.copy(R.BACKEND, path)
    return path


def _load_block(path):
    namespace = {}
    text = path.read_text()
    exec(text[text.index(R.BEGIN):text.index(R.END)], namespace)  # the block alone is plain Python
    return namespace["GPU_VALIDATED"], namespace["GPU_VALIDATED_ON"]


def test_attribution_of_test_ids():
    assert R.attribute("tests/test_rope.py::test_gpu_faces_match_fp64[B3-S256-H5-D64-float16-cuda]") == [
        ("apply_rope_2d", "cuda")]
    assert R.attribute("tests/test_decode.py::test_gpu_cuda_graph_capture_and_replay[triton]") == [
        ("decode_attention", "triton")]
    assert R.attribute("tests/test_decode.py::test_gpu_value_checks_only_under_mirai_debug") == [
        ("decode_attention", "triton"), ("decode_attention", "cuda")]
    assert R.attribute("tests/test_dual_attention.py::test_triton_gpu_matches_fp64[both-bf16]") == [
        ("dual_attention", "triton")]
    assert R.attribute("tests/test_foresight.py::test_gpu_triton_fused_and_cosine[x]") == [
        ("foresight_cosine_loss", "triton"), ("fused_linear_cosine_loss", "triton")]
    assert R.attribute("tests/test_models.py::test_generate_cuda_graph_matches_eager_greedy") == []


def test_fills_the_block_from_a_fake_results_file(tmp_path, backend_copy):
    results = tmp_path / "results"
    _write(results, "gpu-a", _summary([
        ("tests/test_rope.py::test_gpu_faces_match_fp64[s-float16-triton]", "passed"),
        ("tests/test_rope.py::test_gpu_faces_match_fp64[s-float16-cuda]", "passed"),
        ("tests/test_rope.py::test_gpu_faces_match_fp64[t-bfloat16-cuda]", "failed"),  # one failure: not validated
        ("tests/test_dual_attention.py::test_triton_gpu_matches_fp64[x]", "passed"),
        ("tests/test_decode.py::test_gpu_opcheck[cuda]", "skipped"),  # skipped only: not validated
        ("tests/test_models.py::test_generate_cuda_graph_matches_eager_greedy", "failed"),  # no op: ignored
    ]))
    assert R.main(["--results", str(results), "--backend", str(backend_copy)]) == 0
    validated, kinds = _load_block(backend_copy)
    assert validated == {("apply_rope_2d", "triton"): os.path.relpath(results / "gpu-a" / "summary.json", R.ROOT),
                         ("dual_attention", "triton"): os.path.relpath(results / "gpu-a" / "summary.json", R.ROOT)}
    assert kinds == {("apply_rope_2d", "triton"): ("sm_90",), ("dual_attention", "triton"): ("sm_90",)}
    assert R.main(["--results", str(results), "--backend", str(backend_copy), "--check"]) == 0
    # The rest of backend.py is untouched.
    original, new = open(R.BACKEND).read(), backend_copy.read_text()
    assert original[:original.index(R.BEGIN)] == new[:new.index(R.BEGIN)]
    assert original[original.index(R.END):] == new[new.index(R.END):]


def test_newest_run_per_device_kind_decides(tmp_path, backend_copy):
    results = tmp_path / "results"
    test = "tests/test_dual_attention.py::test_triton_gpu_matches_fp64[x]"
    _write(results, "gpu-1", _summary([(test, "passed")], date="2026-12-01T10:00:00+00:00"))
    _write(results, "gpu-2", _summary([(test, "failed")], date="2026-12-02T10:00:00+00:00"))  # revokes on sm_90
    _write(results, "gpu-3", _summary([(test, "passed")], kind="sm_80", date="2026-12-01T11:00:00+00:00"))
    validated, kinds = R.collect(str(results), root=str(results))
    assert validated == {("dual_attention", "triton"): "gpu-3/summary.json"}
    assert kinds == {("dual_attention", "triton"): ("sm_80",)}


@pytest.mark.parametrize("pytest_step, from_log", [
    ({"name": "pytest_gpu", "rc": 124, "timed_out": True}, False),  # killed: some tests never ran
    ({"name": "pytest_gpu", "rc": 0, "timed_out": False}, True),    # outcomes read from a killed run's log
    ({"name": "pytest_gpu", "rc": 4, "timed_out": False}, False),   # pytest usage error
])
def test_incomplete_runs_validate_nothing(tmp_path, pytest_step, from_log):
    results = tmp_path / "results"
    summary = _summary([("tests/test_dual_attention.py::test_triton_gpu_matches_fp64[x]", "passed")],
                       pytest_step=pytest_step)
    if from_log:
        summary["tests"][0]["from"] = "log"
    _write(results, "gpu-x", summary)
    assert R.collect(str(results)) == ({}, {})


def test_committed_block_matches_committed_results():
    """backend.py's GPU_VALIDATED is exactly what the committed results say (no hand edits)."""
    assert R.main(["--check"]) == 0
