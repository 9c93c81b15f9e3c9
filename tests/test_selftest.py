"""``python -m mirai_kernels.selftest`` and how ``auto`` uses its record, on CPU: the C++ faces stand in for a
GPU's, and a monkeypatched device kind stands in for a GPU where the CUDA rules are tested."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch

from mirai_kernels import backend as B
from mirai_kernels import selftest

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
FAST_OPS = ["apply_rope_2d", "foresight_cosine_loss"]  # the cheapest two on CPU


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "selftest.json"
    monkeypatch.setenv("MIRAI_SELFTEST_CACHE", str(path))
    monkeypatch.setattr(B, "_warned", set())
    B.reload_selftest_record()
    yield path
    B.reload_selftest_record()


@pytest.fixture
def fake_gpu(monkeypatch):
    """auto_face on a "cuda" device as on an sm_90 machine with compiled (not interpreted) Triton."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(B, "_cuda_device_kind", lambda index: "sm_90")
    monkeypatch.setattr(B, "GPU_VALIDATED", {})
    monkeypatch.setattr(B, "GPU_VALIDATED_ON", {})


def _record(path, kind, faces, **versions):
    record = {"device": "test device", **B.software_versions(), **versions, "faces": faces}
    path.write_text(json.dumps({"format": 1, "records": {kind: record}}))
    B.reload_selftest_record()


def test_help_needs_no_gpu():
    out = subprocess.run([sys.executable, "-m", "mirai_kernels.selftest", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0 and "selftest" in out.stdout and "--device" in out.stdout


def test_without_a_gpu_it_says_to_use_device_cpu(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert selftest.main([]) == 2
    assert "--device cpu" in capsys.readouterr().err


@pytest.mark.skipif(not B.cpp_available(), reason="C++ extension not built")
def test_cpu_run_records_versions_and_verdicts(cache, capsys):
    assert selftest.main(["--device", "cpu", "--ops", *FAST_OPS, "--faces", "cpp"]) == 0
    out = capsys.readouterr().out
    assert "apply_rope_2d" in out and "pass" in out and str(cache) in out
    record = json.loads(cache.read_text())["records"]["cpu"]
    assert record["faces"] == {"apply_rope_2d/cpp": "pass", "foresight_cosine_loss/cpp": "pass"}
    for key, value in B.software_versions().items():
        assert record[key] == value
    assert all(r["verdict"] == "pass" and r["fwd_err_over_bound"] <= 1 for r in record["cases"])


@pytest.mark.skipif(not B.cpp_available(), reason="C++ extension not built")
def test_a_face_failing_here_is_recorded_and_never_picked(cache, monkeypatch, capsys):
    assert B.auto_face("apply_rope_2d", CPU) == "cpp"

    def broken(op, inputs, static, backend):  # a planted wrong result, 1% off: well beyond fp32's bound
        outs = selftest._call(op, inputs, static, backend)
        return [o * 1.01 for o in outs] if backend == "cpp" and op == "apply_rope_2d" else outs

    monkeypatch.setattr(selftest, "CALL", broken)
    assert selftest.main(["--device", "cpu", "--ops", *FAST_OPS, "--faces", "cpp"]) == 1
    assert "FAIL" in capsys.readouterr().out
    faces = json.loads(cache.read_text())["records"]["cpu"]["faces"]
    assert faces == {"apply_rope_2d/cpp": "fail", "foresight_cosine_loss/cpp": "pass"}
    assert B.auto_face("apply_rope_2d", CPU) == "reference"
    assert B.auto_face("foresight_cosine_loss", CPU) == "cpp"


def test_cuda_auto_warns_once_naming_the_selftest_then_uses_the_record(cache, fake_gpu, caplog):
    if not B.triton_available():
        pytest.skip("triton not installed")
    with caplog.at_level(logging.WARNING, logger="mirai_kernels"):
        assert B.auto_face("dual_attention", CUDA) == "reference"
        assert B.auto_face("foresight_cosine_loss", CUDA) == "reference"
    warnings = [r.getMessage() for r in caplog.records if r.name == "mirai_kernels"]
    assert len(warnings) == 1 and "python -m mirai_kernels.selftest" in warnings[0] and "sm_90" in warnings[0]

    _record(cache, "sm_90", {"dual_attention/triton": "pass"})
    assert B.auto_face("dual_attention", CUDA) == "triton"
    assert B.auto_face("foresight_cosine_loss", CUDA) == "reference"  # not in the record
    _record(cache, "sm_80", {"dual_attention/triton": "pass"})  # another device kind's record
    assert B.auto_face("dual_attention", CUDA) == "reference"


def test_precedence_local_failure_beats_the_committed_record(cache, fake_gpu, monkeypatch):
    if not B.triton_available():
        pytest.skip("triton not installed")
    monkeypatch.setattr(B, "GPU_VALIDATED", {("dual_attention", "triton"): "benchmarks/results/x/summary.json"})
    monkeypatch.setattr(B, "GPU_VALIDATED_ON", {("dual_attention", "triton"): ("sm_90",)})
    assert B.auto_face("dual_attention", CUDA) == "triton"  # committed record alone
    _record(cache, "sm_90", {"dual_attention/triton": "fail"})
    assert B.auto_face("dual_attention", CUDA) == "reference"  # failed on this machine: never picked
    monkeypatch.setattr(B, "GPU_VALIDATED_ON", {("dual_attention", "triton"): ("sm_80",)})
    _record(cache, "sm_90", {})
    assert B.auto_face("dual_attention", CUDA) == "reference"  # committed for another device kind only


@pytest.mark.parametrize("changed", ["torch", "triton", "mirai_kernels"])
def test_a_stale_record_is_ignored_with_one_warning(cache, fake_gpu, caplog, changed):
    if not B.triton_available():
        pytest.skip("triton not installed")
    _record(cache, "sm_90", {"dual_attention/triton": "pass"}, **{changed: "0.0.0-old"})
    with caplog.at_level(logging.WARNING, logger="mirai_kernels"):
        assert B.auto_face("dual_attention", CUDA) == "reference"
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and changed in stale[0] and "0.0.0-old" in stale[0] and "selftest" in stale[0]
    # A failure in a stale record does not block the face either: the whole record is ignored.
    _record(cache, "cpu", {"apply_rope_2d/cpp": "fail"}, **{changed: "0.0.0-old"})
    if B.cpp_available():
        assert B.auto_face("apply_rope_2d", CPU) == "cpp"


def test_an_unreadable_record_is_ignored_with_a_warning(cache, caplog):
    cache.write_text("{not json")
    B.reload_selftest_record()
    with caplog.at_level(logging.WARNING, logger="mirai_kernels"):
        assert B.auto_face("apply_rope_2d", CPU) == ("cpp" if B.cpp_available() else "reference")
    assert any("ignoring the selftest record" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not B.cpp_available(), reason="C++ extension not built")
def test_an_unwritable_cache_fails_clearly_and_records_nothing(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(B, "_warned", set())
    assert selftest.main(["--device", "cpu", "--ops", "apply_rope_2d", "--faces", "cpp",
                          "--cache", str(blocker / "selftest.json")]) == 3
    captured = capsys.readouterr()
    assert "apply_rope_2d" in captured.out  # the table is still printed
    assert "could not write" in captured.err and "MIRAI_SELFTEST_CACHE" in captured.err


def test_write_record_keeps_other_device_kinds(tmp_path):
    path = tmp_path / "c.json"
    selftest.write_record(str(path), "sm_90", {"faces": {"a/triton": "pass"}})
    selftest.write_record(str(path), "sm_80", {"faces": {"a/triton": "fail"}})
    selftest.write_record(str(path), "sm_90", {"faces": {"a/triton": "fail"}})
    records = json.loads(path.read_text())["records"]
    assert records == {"sm_90": {"faces": {"a/triton": "fail"}}, "sm_80": {"faces": {"a/triton": "fail"}}}


def test_default_cache_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("MIRAI_SELFTEST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert B.selftest_cache_path() == str(tmp_path / "mirai_kernels" / "selftest.json")
