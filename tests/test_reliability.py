"""Reliability and security of the model layer's files and command lines (README, "Guarantees"): checkpoints load under one
safe policy, harmful CLI values are refused at parse time with the flag and its range, and a resumed run neither
loses nor repeats anything."""

import hashlib
import json
import os
import pickle
import re

import pytest
import torch

from models import evaluate as evaluate_mod
from models import sample as sample_mod
from models import train as train_mod
from models.nets.gpt import load_sampling_model

TINY = ["--grid", "4", "--data-size", "64", "--batch-size", "8", "--no-progress", "--log-every", "1", "--lr", "1e-3"]


def train_args(out, *extra):
    return train_mod.parse_args(["--out", str(out), *TINY, *extra])


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step mirai-e run (checkpoint every step) and a 1-step run without a null class (--class-dropout 0)."""
    root = tmp_path_factory.mktemp("runs")
    train_mod.train(train_args(root / "e", "--steps", "2", "--objective", "mirai-e", "--warmup", "1",
                               "--head-width", "16", "--ckpt-every", "1"))
    train_mod.train(train_args(root / "nonull", "--steps", "1", "--class-dropout", "0"))
    return root


# ---------------------------------------------------------------------------------------------------------
# One loader, one policy: weights_only=True, nothing executes
# ---------------------------------------------------------------------------------------------------------


class WritesMarker:
    """Unpickling this object creates the file ``path`` (a stand-in for arbitrary code execution)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def malicious_files(tmp_path):
    marker = tmp_path / "PWNED"
    payload = {"config": {}, "model": WritesMarker(marker)}
    zipped, legacy, raw = tmp_path / "evil.pt", tmp_path / "evil_legacy.pt", tmp_path / "evil.pkl"
    torch.save(payload, zipped)
    torch.save(payload, legacy, _use_new_zipfile_serialization=False)
    with open(raw, "wb") as f:
        pickle.dump(payload, f, protocol=4)
    return marker, [zipped, legacy, raw]


def test_malicious_payload_is_real(tmp_path):
    """The files of the next test do execute code when unpickled without the policy (so refusing them means
    something)."""
    marker, files = malicious_files(tmp_path)
    with open(files[2], "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_malicious_checkpoint_is_refused_by_every_loader(tmp_path):
    from models.checkpoint import UnsafeCheckpointError, load_checkpoint
    from models.nets.classifier import load_classifier
    from models.nets.encoder import load_encoder

    marker, files = malicious_files(tmp_path)
    loaders = [load_checkpoint, load_sampling_model, load_classifier, load_encoder,
               lambda p: sample_mod.main(["--ckpt", str(p), "--out", str(tmp_path / "s.png")]),
               lambda p: evaluate_mod.main(["--ckpt", str(p), "--n", "4", "--out", str(tmp_path / "e.json")])]
    for path in files:
        for load in loaders:
            with pytest.raises(UnsafeCheckpointError, match=r"refusing to load .*evil.*(io\.open|builtins\.open)"):
                load(str(path))
            assert not marker.exists(), (path, load)
    # --resume reads last.pt through the same loader
    run = tmp_path / "run"
    run.mkdir()
    os.replace(files[0], run / "last.pt")
    with pytest.raises(UnsafeCheckpointError):
        train_mod.train(train_args(run, "--steps", "2", "--resume"))
    assert not marker.exists()


def test_no_loader_bypasses_the_policy():
    """Every checkpoint read in models/ and benchmarks/ goes through models.checkpoint, and nothing in the repo
    unpickles with weights_only off (a new torch.load elsewhere fails here, not in a user's hands)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    offenders = []
    for top in ("models", "benchmarks", "mirai_kernels", "tests"):
        for folder, _, names in os.walk(os.path.join(root, top)):
            for name in names:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root)
                text = open(path, encoding="utf-8").read()
                if "weights_only=" + "False" in text:
                    offenders.append(f"{rel}: unpickles with weights_only off")
                if top in ("models", "benchmarks") and rel != os.path.join("models", "checkpoint.py") \
                        and re.search(r"\btorch\.load\(", text):
                    offenders.append(f"{rel}: torch.load outside models/checkpoint.py")
    assert not offenders, offenders


def test_own_checkpoints_need_no_extra_types(tiny_run, tmp_path):
    """Every kind of file we write loads under weights_only=True with an empty allow-list (OWN_TYPES)."""
    from models.checkpoint import OWN_TYPES, load_checkpoint
    from models.nets.classifier import save_classifier, train_classifier
    from models.data.shapes import build_dataset
    from models.nets.encoder import save_encoder, train_token_encoder

    assert OWN_TYPES == ()
    data = build_dataset("shapes", size=32, grid=4, seed=0)
    save_encoder(train_token_encoder(data, steps=1, dim=16, depth=1, heads=2), str(tmp_path / "enc.pt"))
    save_classifier(train_classifier(data, steps=1)[0], str(tmp_path / "clf.pt"), {"steps": 1})
    files = [tiny_run / "e" / "last.pt", tiny_run / "e" / "model.pt", tmp_path / "enc.pt", tmp_path / "clf.pt"]
    for path in files:
        assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == [], path
        assert isinstance(load_checkpoint(str(path)), dict)


def test_allow_admits_exactly_the_named_types(tmp_path):
    import argparse

    from models.checkpoint import LLAMAGEN_TYPES, UnsafeCheckpointError, load_checkpoint

    path = tmp_path / "llamagen.pt"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(gpt_model="GPT-B")}, path)
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        load_checkpoint(str(path))
    assert load_checkpoint(str(path), allow=LLAMAGEN_TYPES)["args"].gpt_model == "GPT-B"


def test_damaged_files_get_clear_messages(tiny_run, tmp_path):
    from models.checkpoint import CheckpointError, CheckpointNotFoundError, load_checkpoint

    good = (tiny_run / "e" / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "notes.pt").write_text("hello, not a checkpoint\n")
    cases = {"truncated.pt": "truncated or corrupt", "empty.pt": "empty", "notes.pt": "not a torch checkpoint",
             ".": "directory"}
    for name, words in cases.items():
        with pytest.raises(CheckpointError, match=words):
            load_checkpoint(str(tmp_path / name))
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        load_checkpoint(str(tmp_path / "missing.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="not a mirai checkpoint"):
        load_sampling_model(str(tmp_path / "list.pt"))
    with pytest.raises(CheckpointError, match="not a palette-classifier"):
        from models.nets.classifier import load_classifier

        load_classifier(str(tmp_path / "list.pt"))


def test_atomic_save_and_stale_tmp_cleanup(tmp_path):
    from models.checkpoint import atomic_save, clean_stale_tmp

    path = tmp_path / "last.pt"
    atomic_save({"step": 1}, str(path))
    assert os.listdir(tmp_path) == ["last.pt"]
    dead = tmp_path / "last.pt.tmp.4194305"  # above Linux's pid_max: no such process
    live = tmp_path / f"last.pt.tmp.{os.getppid()}"  # a live writer's file stays
    dead.write_bytes(b"partial")
    live.write_bytes(b"partial")
    assert clean_stale_tmp(str(path)) == [str(dead)]
    assert live.exists() and not dead.exists()


# ---------------------------------------------------------------------------------------------------------
# Every numeric flag validated at parse time, with the flag and its range in the message
# ---------------------------------------------------------------------------------------------------------

TRAIN_BAD = [
    ("--steps", "-5"), ("--steps", "0"), ("--batch-size", "-4"), ("--batch-size", "0"), ("--grad-clip", "-1"),
    ("--grad-clip", "0"), ("--ema-decay", "2"), ("--ema-decay", "1"), ("--ema-decay", "-0.1"), ("--data-size", "0"),
    ("--log-every", "0"), ("--foresight-layer", "0"), ("--head-width", "0"), ("--class-dropout", "-0.1"),
    ("--class-dropout", "1"), ("--dropout", "1.5"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"),
    ("--weight-decay", "-1"), ("--grid", "1"), ("--image-size", "0"), ("--seed", "-1"), ("--ckpt-every", "-1"),
    ("--seed", "2000000"), ("--device", "bogus"), ("--warmup", "-3"), ("--warmup", "1.5"), ("--warmup", "abc"), ("--halve-at", "-0.2"), ("--steps", "2.5"),
]
SAMPLING_BAD = [
    ("--n", "0"), ("--batch-size", "0"), ("--top-p", "-0.1"), ("--top-p", "1.5"), ("--top-k", "-1"),
    ("--temperature", "-1"), ("--temperature", "nan"), ("--cfg", "0.5"), ("--cfg", "inf"), ("--seed", "-1"),
    ("--seed", str(2 ** 32)), ("--device", "bogus"),
]
SAMPLE_BAD = SAMPLING_BAD + [("--scale", "0"), ("--classes", "-1")]
EVALUATE_BAD = SAMPLING_BAD + [("--n", "1"), ("--n-ref", "1"), ("--data-seed", "-1"), ("--kid-subsets", "0"),
                               ("--classifier-steps", "0")]


def refused(parse, argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv)
    err = capsys.readouterr().err
    found = re.search(rf"argument {flag}(/[-\w]+)*: (.*)", err)  # argparse names every alias: --n/--num-samples
    assert info.value.code == 2 and found, err
    message = found.group(2)
    # the message states what is valid: a range for numbers, examples for a device
    valid = ("device",) if flag == "--device" else (">=", "[", "(")
    assert any(word in message for word in valid), message


@pytest.mark.parametrize("flag,value", TRAIN_BAD)
def test_train_refuses_harmful_values(flag, value, capsys):
    refused(train_mod.parse_args, [flag, value], flag, capsys)


@pytest.mark.parametrize("flag,value", SAMPLE_BAD)
def test_sample_refuses_harmful_values(flag, value, capsys):
    refused(sample_mod.parse_args, ["--ckpt", "x.pt", flag, value], flag, capsys)


@pytest.mark.parametrize("flag,value", EVALUATE_BAD)
def test_evaluate_refuses_harmful_values(flag, value, capsys):
    refused(evaluate_mod.parse_args, ["--ckpt", "x.pt", flag, value], flag, capsys)


def test_good_values_still_parse():
    args = train_mod.parse_args(["--warmup", "15", "--halve-at", "0.27", "--ema-decay", "0.999", "--grad-clip", "inf",
                                 "--ckpt-every", "0", "--class-dropout", "0", "--foresight-layer", "2"])
    assert (args.warmup, args.halve_at, args.grad_clip, args.foresight_layer) == ("15", "0.27", float("inf"), 2)
    assert train_mod.parse_args([]).head_width is None and train_mod.parse_args([]).foresight_layer is None
    assert train_mod.steps_or_fraction("0.05", 300) == 15 and train_mod.steps_or_fraction("15", 300) == 15
    s = sample_mod.parse_args(["--ckpt", "x", "--top-p", "0", "--top-k", "0", "--temperature", "0", "--cfg", "1"])
    assert (s.top_p, s.temperature, s.cfg) == (0.0, 0.0, 1.0)  # top-p 0 and temperature 0 mean greedy


def test_train_checks_flags_against_the_data_and_model(tmp_path):
    with pytest.raises(ValueError, match="--batch-size 128.*64"):
        train_mod.train(train_args(tmp_path, "--steps", "1", "--batch-size", "128"))
    with pytest.raises(ValueError, match="--foresight-layer 9"):
        train_mod.train(train_args(tmp_path, "--steps", "1", "--objective", "mirai-e", "--foresight-layer", "9"))
    assert not (tmp_path / "model.pt").exists()


def test_sample_request_errors_are_clear(tiny_run, tmp_path):
    ckpt = str(tiny_run / "e" / "model.pt")
    out = ["--out", str(tmp_path / "s.png"), "--n", "2"]
    with pytest.raises(ValueError, match=r"--classes \[10\].*10 classes"):
        sample_mod.main(["--ckpt", ckpt, "--classes", "3", "10", *out])
    nonull = str(tiny_run / "nonull" / "model.pt")
    with pytest.raises(ValueError, match="--cfg 2.*null class.*--class-dropout 0"):
        sample_mod.main(["--ckpt", nonull, *out])
    with pytest.raises(ValueError, match="--cfg 2.*null class"):
        evaluate_mod.main(["--ckpt", nonull, "--n", "4", "--out", str(tmp_path / "e.json")])
    sample_mod.main(["--ckpt", nonull, "--cfg", "1", *out])  # without guidance it samples
    assert (tmp_path / "s.png").exists()


# ---------------------------------------------------------------------------------------------------------
# Nothing lost: resume rules, the metrics log and temp files across a kill
# ---------------------------------------------------------------------------------------------------------


def test_resume_below_the_checkpoint_step_is_refused(tiny_run):
    run = tiny_run / "e"
    before = digest(run / "last.pt")
    with pytest.raises(ValueError, match="--steps 1.*step 2"):
        train_mod.train(train_args(run, "--steps", "1", "--objective", "mirai-e", "--warmup", "1",
                                   "--head-width", "16", "--resume"))
    assert digest(run / "last.pt") == before


def test_resume_with_another_seed_is_refused(tiny_run):
    run = tiny_run / "e"
    before = digest(run / "last.pt")
    with pytest.raises(ValueError, match="--seed 1.*--seed 0"):
        train_mod.train(train_args(run, "--steps", "3", "--objective", "mirai-e", "--warmup", "1",
                                   "--head-width", "16", "--resume", "--seed", "1"))
    assert digest(run / "last.pt") == before


def test_resume_after_a_kill_repeats_no_log_rows_and_cleans_temp_files(tmp_path):
    run = tmp_path / "run"
    common = ["--objective", "mirai-e", "--warmup", "1", "--head-width", "16"]
    train_mod.train(train_args(run, "--steps", "2", *common))
    # The kill: the run went on logging steps 3 and 4 (the last row half-written) and died while writing last.pt.
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0})[:9])
    (run / "last.pt.tmp.4194305").write_bytes(b"torn")
    (run / "model.pt.tmp.4194306").write_bytes(b"torn")
    train_mod.train(train_args(run, "--steps", "5", *common, "--resume"))
    rows = [row for row in map(json.loads, open(run / "metrics.jsonl")) if "step" in row]  # not the config rows
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert all(row["loss"] != 1.0 for row in rows)  # the dead run's rows are gone, not kept beside the new ones
    assert sorted(os.listdir(run)) == ["config.json", "last.pt", "metrics.jsonl", "model.pt"]


def test_output_paths_are_checked_before_any_work(tiny_run, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match="--out .*afile is a file"):
        train_mod.train(train_args(afile, "--steps", "1"))
    ckpt = str(tiny_run / "e" / "model.pt")
    with pytest.raises(ValueError, match="--out .* is a directory"):
        sample_mod.main(["--ckpt", ckpt, "--out", str(tmp_path), "--n", "2"])
    with pytest.raises(ValueError, match="--out .* is a directory"):
        evaluate_mod.main(["--ckpt", ckpt, "--out", str(tmp_path), "--n", "2"])
    # a new run over an earlier run's directory says that it overwrites its last.pt
    run = tmp_path / "run"
    train_mod.train(train_args(run, "--steps", "1"))
    capsys.readouterr()
    train_mod.train(train_args(run, "--steps", "1"))
    assert "last.pt of an earlier run will be overwritten" in capsys.readouterr().err


def test_command_line_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    from models.cli import run_main

    with pytest.raises(SystemExit) as info:
        run_main(lambda: sample_mod.main(["--ckpt", str(tmp_path / "missing.pt")]), "models.sample")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("models.sample: error: --ckpt not found") and "Traceback" not in err


@pytest.mark.parametrize("objective", ["mirai-e", "mirai-s"])
def test_training_steps_read_nothing_back_between_log_steps(tmp_path, monkeypatch, objective):
    """A step that is not logged forces no host sync (on a GPU each one stalls the queue): no ``.item()``,
    ``.tolist()``, ``float(t)`` / ``int(t)`` or ``torch.cuda.synchronize()`` in the model, the objective, the
    backward, clip, AdamW or the EMA refresh. Counted over whole runs of 3 and 6 steps that both log once (the last
    step): equal counts, so the 3 extra steps read nothing. The data pipeline's reads of its own CPU tensors are not
    device syncs and are not counted, nor torch.optim's ``.item()`` of AdamW's step counters (CPU tensors on every
    device, by torch's design). The counter does see the log step's reads (two log rows count more)."""
    import sys

    counts = {"n": 0}
    counting = {"on": True}

    def counted(original):
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace(os.sep, "/")
            if counting["on"] and "/torch/optim/" not in caller:
                counts["n"] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cuda, "synchronize", counted(torch.cuda.synchronize))
    collate = train_mod.collate

    def uncounted_collate(*args):
        counting["on"] = False
        try:
            return collate(*args)
        finally:
            counting["on"] = True

    monkeypatch.setattr(train_mod, "collate", uncounted_collate)

    def reads(steps, log_every, *extra):
        before = counts["n"]
        train_mod.train(train_args(tmp_path / f"{steps}-{log_every}", "--steps", str(steps), "--log-every",
                                   str(log_every), "--objective", objective, "--warmup", "1", "--ema-decay", "0.9",
                                   "--head-width", "16", *extra))
        return counts["n"] - before

    assert reads(3, 3, "--grad-accum", "2") == reads(6, 6, "--grad-accum", "2")
    assert reads(6, 3) > reads(6, 6) > 0
