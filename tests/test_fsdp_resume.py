"""``--fsdp`` runs resume: FSDP2 shards are checkpointed with torch.distributed.checkpoint (DCP) into ``OUT/last.dcp``
(atomic: temp directory + swap; read safely: tensors only, DCP's metadata pickle through an allow-list), and a run
killed after a checkpoint and resumed ends bit-exact with an uninterrupted one (2 gloo processes on CPU, dropout
on); the checkpoint also loads on another world size (resharded); the refusals of a DDP resume apply."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch

from models import checkpoint as ckpt_mod
from models import train as train_mod
from models.cli import UsageError
from models.nets.gpt import load_sampling_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# global batch 12: splits over 2 and over 3 processes; dropout on, so each rank's RNG stream matters
COMMON = ["--model", "micro", "--grid", "4", "--data-size", "48", "--batch-size", "12", "--no-progress",
          "--log-every", "1", "--dropout", "0.3", "--lr", "1e-3", "--device", "cpu", "--objective", "mirai-e",
          "--head-width", "16", "--warmup", "1", "--ema-decay", "0.9", "--fsdp"]
DEAD_PID = 4194305  # above Linux's largest pid_max: no live process has it


def torchrun(out, steps, *extra, nproc=2):
    # --standalone: a free rendezvous port per run, so a concurrent run elsewhere on the machine cannot collide
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                             "--standalone", "-m", "models.train", "--out", str(out), *COMMON, "--steps",
                             str(steps), *extra], env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def rows(out):
    return [row for row in map(json.loads, open(out / "metrics.jsonl")) if "step" in row]


def assert_same_tensors(a, b, where=""):
    assert isinstance(a, dict) and isinstance(b, dict) and sorted(a) == sorted(b), where
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), f"{where}.{key} differs"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    torchrun(root / "whole", 4)
    torchrun(root / "split", 2)
    shutil.copytree(root / "split", root / "at2")  # the step-2 checkpoint, for the resharding and refusal tests
    # The kill, after the step-2 checkpoint: the run logged steps 3 and 4 (the last row half-written), started its
    # next checkpoint (a torn temp directory) and died between the two renames of the swap (no last.dcp, the
    # previous one parked as last.dcp.old.<pid>).
    with open(root / "split" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "loss": 1.0}) + "\n" + json.dumps({"step": 4, "loss": 1.0})[:9])
    (root / "split" / f"last.dcp.tmp.{DEAD_PID}").mkdir()
    (root / "split" / f"last.dcp.tmp.{DEAD_PID}" / "__0_0.distcp").write_bytes(b"torn")
    os.rename(root / "split" / "last.dcp", root / "split" / f"last.dcp.old.{DEAD_PID}")
    torchrun(root / "split", 4, "--resume")
    return root


def test_fsdp_resume_is_bit_exact_with_an_uninterrupted_run(runs):
    whole, split = runs / "whole", runs / "split"
    assert [(r["step"], r["loss"], r["ntp"], r["grad_norm"]) for r in rows(split)] == \
           [(r["step"], r["loss"], r["ntp"], r["grad_norm"]) for r in rows(whole)]
    assert [r["step"] for r in rows(split)] == [1, 2, 3, 4]  # the dead run's rows are gone, each step once
    a, b = ckpt_mod.read_sharded(str(whole / "last.dcp")), ckpt_mod.read_sharded(str(split / "last.dcp"))
    assert sorted(a) == ["ema", "optimizer", "trained"]
    assert all(sorted(v) == ["exp_avg", "exp_avg_sq", "step"] for v in a["optimizer"].values())
    assert sorted(a["optimizer"]) == sorted(a["trained"]) and any(k.startswith("objective.heads") for k in a["trained"])
    assert_same_tensors(a, b)  # parameters, foresight heads, EMA and AdamW state (moments, step counts) bit-exact
    meta = ckpt_mod.load_sharded_meta(str(split / "last.dcp"))
    assert meta["step"] == 4 and len(meta["rng_per_rank"]) == 2 and meta["run_config"]["steps"] == 4
    assert not torch.equal(meta["rng_per_rank"][0], meta["rng_per_rank"][1])  # each rank its own dropout stream
    # the interrupted swap was undone and every leftover removed; the sampling checkpoint is the gathered EMA
    assert sorted(os.listdir(split)) == ["config.json", "last.dcp", "metrics.jsonl", "model.pt"]
    model = load_sampling_model(str(split / "model.pt"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in a["ema"].items())


def test_fsdp_checkpoint_loads_on_another_world_size(runs):
    """The 2-process step-2 checkpoint resumed by 3 processes (DCP reshards every DTensor) and saved again without
    a step in between holds exactly the same tensors; the dropout streams cannot carry over, which is said."""
    out = runs / "at2-on-3"
    shutil.copytree(runs / "at2", out)
    result = torchrun(out, 2, "--resume", nproc=3)
    assert "written by 2 process(es), this run has 3" in result.stderr
    assert_same_tensors(ckpt_mod.read_sharded(str(runs / "at2" / "last.dcp")),
                        ckpt_mod.read_sharded(str(out / "last.dcp")))
    assert len(ckpt_mod.load_sharded_meta(str(out / "last.dcp"))["rng_per_rank"]) == 3


def test_fsdp_resume_refuses_what_a_ddp_resume_refuses(runs):
    at2 = runs / "at2"

    def check(*extra):
        args = train_mod.parse_args(["--out", str(at2), *COMMON, "--resume", *extra])
        return train_mod.read_resume_state(os.path.join(str(at2), "last.dcp"), args, args.steps)

    assert check("--steps", "4")["step"] == 2
    with pytest.raises(UsageError, match="already at step 2"):
        check("--steps", "1")
    with pytest.raises(UsageError, match="--seed 1 but .* --seed 0"):
        check("--steps", "4", "--seed", "1")
    with pytest.raises(UsageError, match="--batch-size 24 but .* --batch-size 12"):
        check("--steps", "4", "--batch-size", "24")
    # a sharded checkpoint is resumed with --fsdp, a full one without
    plain = [a for a in COMMON if a != "--fsdp"]
    with pytest.raises(UsageError, match="last.dcp.*--fsdp"):
        train_mod.read_resume_state(os.path.join(str(at2), "last.pt"),
                                    train_mod.parse_args(["--out", str(at2), *plain, "--resume"]), 4)


def test_sharded_checkpoint_metadata_is_never_unpickled_with_code(tmp_path):
    """DCP reads its .metadata with a bare pickle.load; ours allows only the metadata's own types."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "last.dcp"
    bad.mkdir()
    with open(bad / ".metadata", "wb") as f:
        pickle.dump(Payload(), f)
    with pytest.raises(ckpt_mod.UnsafeCheckpointError, match="posix.system"):
        ckpt_mod.read_sharded(str(bad))
    assert not marker.exists()
    (bad / ".metadata").write_bytes(b"\x80\x04torn")
    with pytest.raises(ckpt_mod.CheckpointError, match="truncated or corrupt"):
        ckpt_mod.read_sharded(str(bad))
    with pytest.raises(ckpt_mod.CheckpointNotFoundError):
        ckpt_mod.read_sharded(str(tmp_path / "missing.dcp"))


def test_sharded_save_is_atomic_and_tensor_only(tmp_path):
    """In one gloo process: a save replaces the previous directory whole and leaves no temp directory; non-tensor
    state is refused (DCP would pickle it); a swap cut between its renames is undone by recover_sharded."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        path = str(tmp_path / "ck.dcp")
        ckpt_mod.atomic_save_sharded({"w": {"a": torch.arange(4.0)}}, {"step": 1}, path)
        ckpt_mod.atomic_save_sharded({"w": {"a": torch.arange(4.0) + 1}}, {"step": 2}, path)
        assert sorted(os.listdir(tmp_path)) == ["ck.dcp", "store"]
        assert torch.equal(ckpt_mod.read_sharded(path)["w"]["a"], torch.arange(4.0) + 1)
        assert ckpt_mod.load_sharded_meta(path)["step"] == 2
        with pytest.raises(TypeError, match="'w.lr' is a float"):
            ckpt_mod.atomic_save_sharded({"w": {"lr": 0.1}}, {}, path)
        target = {"w": {"a": torch.zeros(4)}}
        ckpt_mod.load_sharded(target, path)
        assert torch.equal(target["w"]["a"], torch.arange(4.0) + 1)
    finally:
        dist.destroy_process_group()
    os.rename(path, f"{path}.old.{DEAD_PID}")
    assert ckpt_mod.recover_sharded(path) and ckpt_mod.load_sharded_meta(path)["step"] == 2
    os.makedirs(f"{path}.tmp.{DEAD_PID}")
    assert ckpt_mod.clean_stale_sharded(path) == [f"{path}.tmp.{DEAD_PID}"] and os.path.isdir(path)
