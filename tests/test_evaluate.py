"""Evaluation (models/evaluate.py, models/nets/classifier.py): torch-fidelity metrics on the project classifier's
features, the structure metric, the data floor and the CLI end to end. CPU, small sets, a briefly trained
classifier (well under a minute in all)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("torch_fidelity")  # the [eval] extra; .ci/setup installs it

from models import evaluate as ev  # noqa: E402
from models import train as train_mod  # noqa: E402
from models.data.shapes import ShapesDataset  # noqa: E402
from models.nets.classifier import (  # noqa: E402
    builtin_classifier, images_to_tokens, load_classifier, register_with_torch_fidelity, save_classifier,
    train_classifier)

GRID = (8, 8)
N = 200


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    # Trained briefly (held-out accuracy ~0.65; the built-in one reaches ~0.99), yet its features already order
    # floor < 25% shuffled < fully shuffled by a factor ~5 each (0.09 / 2.6 / 14 here).
    rng = torch.get_rng_state()
    model, info = train_classifier(ShapesDataset(2048, seed=11), steps=80, lr=2e-3, seed=0,
                                   eval_dataset=ShapesDataset(300, seed=12))
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG stream is left alone
    assert info["heldout_accuracy"] > 0.4, info  # far above chance (0.1)
    path = str(tmp_path_factory.mktemp("clf") / "classifier.pt")
    save_classifier(model, path, info)
    return path


@pytest.fixture(scope="module")
def sets():
    ref_tokens, ref_labels = ev.split_tokens("shapes", GRID, 0, N, "heldout")
    train_tokens, train_labels = ev.split_tokens("shapes", GRID, 0, N, "train")
    assert torch.equal(ref_labels, train_labels)  # same class balance on both sides
    return ref_tokens, train_tokens, train_labels


def metrics(tokens_a, tokens_b, classifier, **kwargs):
    return ev.fidelity_metrics(ev.tokens_to_images(tokens_a, GRID), ev.tokens_to_images(tokens_b, GRID),
                               feature_extractor=register_with_torch_fidelity(), weights_path=classifier,
                               kid_subsets=20, **kwargs)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Independent FID: ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), by symmetric eigh."""
    def sqrt_psd(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = sqrt_psd(s_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b) - 2 * np.trace(sqrt_psd(root_a @ s_b @ root_a)))


def shuffle_pixels(tokens: torch.Tensor, fraction: float = 1.0, seed: int = 0) -> torch.Tensor:
    """Permute a ``fraction`` of each image's pixel positions among themselves (same colours, broken layout)."""
    g = torch.Generator().manual_seed(seed)
    out = tokens.clone()
    k = max(2, int(fraction * tokens.shape[1]))
    for row in out:
        pos = torch.randperm(tokens.shape[1], generator=g)[:k]
        row[pos] = row[pos[torch.randperm(k, generator=g)]]
    return out


def test_identical_inputs(classifier, sets):
    ref, _, _ = sets
    m = metrics(ref, ref, classifier)
    assert abs(m["fid"]) < 1e-6  # same features on both sides: mu and Sigma agree exactly
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["f_score"] == pytest.approx(1.0)
    assert 1.0 <= m["isc_mean"] <= 10.0  # IS lies in [1, number of classes]


def test_fid_matches_an_independent_computation(classifier, sets):
    ref, train, _ = sets
    clf = load_classifier(classifier)
    with torch.no_grad():
        fa, fb = (clf(t)[0].double().numpy() for t in (train, ref))
    m = metrics(train, ref, classifier)
    assert m["fid"] == pytest.approx(frechet_distance(fa, fb), rel=1e-4)  # eigvals vs eigh, fp32 features
    # The feature extractor sees exactly the tokens: RGB palette images map back losslessly.
    assert torch.equal(images_to_tokens(ev.tokens_to_images(ref, GRID).permute(0, 3, 1, 2)), ref)


def test_degraded_samples_score_worse(classifier, sets):
    ref, train, labels = sets
    floor = metrics(train, ref, classifier)
    mild = shuffle_pixels(train, fraction=0.25, seed=1)
    broken = shuffle_pixels(train, fraction=1.0, seed=2)
    m_mild, m_broken = metrics(mild, ref, classifier), metrics(broken, ref, classifier)
    assert floor["fid"] < m_mild["fid"] < m_broken["fid"], (floor, m_mild, m_broken)
    assert floor["kid_mean"] < m_broken["kid_mean"]
    assert m_broken["precision"] < floor["precision"] and m_broken["recall"] < floor["recall"]
    assert m_broken["isc_mean"] < floor["isc_mean"]
    # Structure is all-or-nothing per image: 3 of 64 pixels permuted already break about half of them.
    slight = shuffle_pixels(train, fraction=0.05, seed=3)
    s_floor, s_slight, s_mild, s_broken = (ev.structure_metric(t, labels, GRID)["structure"]
                                           for t in (train, slight, mild, broken))
    assert s_floor == 1.0 and 0.0 < s_slight < 1.0 and s_mild <= s_slight and s_broken == 0.0, (
        s_floor, s_slight, s_mild, s_broken)


def test_structure_metric_per_class():
    tokens, labels = ev.split_tokens("shapes", GRID, 3, 20, "train")
    tokens[labels == 0] = 5  # one colour everywhere: not two alternating stripes
    s = ev.structure_metric(tokens, labels, GRID)
    assert s["structure_per_class"]["horizontal_stripes"] == 0.0
    assert s["structure_per_class"]["frame"] == 1.0
    assert s["structure"] == pytest.approx(0.9)


def test_input_checks(classifier, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        ev.ImageSet(torch.zeros(2, 8, 8, 3))
    with pytest.raises(ValueError, match="--inception-weights"):
        ev.evaluate(ev.parse_args(["--ckpt", "x.pt", "--ref-npz", "ref.npz"]))
    with pytest.raises(FileNotFoundError, match="classifier weights not found"):
        load_classifier(str(tmp_path / "missing.pt"))


def test_scorer_reuses_its_reference_and_floor(classifier, sets, tmp_path):
    """The in-process API the convergence study calls every few steps: one Scorer, many score() calls."""
    _, train, labels = sets
    scorer = ev.Scorer("shapes", GRID, n_ref=N, num_classes=10, cache_dir=str(tmp_path), classifier=classifier,
                       kid_subsets=10)
    floor = scorer.floor(N)
    assert floor["structure"] == 1.0 and floor["n"] == N
    assert scorer.score(train, labels, seed=0)["fid"] == pytest.approx(floor["fid"], rel=1e-9)
    assert scorer.floor(N) == floor  # from the JSON cache
    assert len([f for f in os.listdir(tmp_path / "fidelity-cache") if scorer.ref_name in f]) == 3
    with pytest.raises(ValueError, match="is for"):
        ev.Scorer("shapes", (4, 4), n_ref=20, cache_dir=str(tmp_path), classifier=classifier)


def test_interleave_inverts_rank_sharding():
    whole = torch.arange(14).view(7, 2)
    for world in (1, 2, 3, 7):
        assert torch.equal(ev.interleave([whole[r::world] for r in range(world)], 7), whole)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 3-step GPT checkpoint on 4x4 shapes (the 16-step sampler keeps the CLI runs quick; the 8x8 path is the
    one the tests above use) and an evaluation cache directory shared by the CLI tests."""
    root = tmp_path_factory.mktemp("eval_run")
    train_mod.train(train_mod.parse_args(["--out", str(root / "run"), "--grid", "4", "--data-size", "64",
                                          "--batch-size", "8", "--steps", "3", "--no-progress", "--log-every", "3"]))
    return root / "run", root / "cache"


def test_cli_end_to_end(tmp_path, tiny_run, capsys):
    run, cache = tiny_run
    common = ["--ckpt", str(run / "model.pt"), "--n-ref", "60", "--kid-subsets", "10", "--batch-size", "40",
              "--classifier-steps", "30", "--cache-dir", str(cache), "--cfg", "1.5"]
    argv = common + ["--n", "40"]
    result = ev.main(argv)
    printed = capsys.readouterr().out
    assert "fid" in printed and "data floor" in printed and "structure" in printed

    with open(run / "eval.json") as f:
        saved = json.load(f)
    for key in ("fid", "kid_mean", "kid_std", "isc_mean", "precision", "recall", "structure"):
        assert np.isfinite(saved["metrics"][key]), key
        assert np.isfinite(saved["floor"][key]), key
    assert saved["floor"]["structure"] == 1.0 and 0.0 <= saved["metrics"]["structure"] <= 1.0
    assert saved["n"] == 40 and saved["n_ref"] == 60 and saved["sampling"]["cfg_scale"] == 1.5
    with np.load(run / "eval.npz") as npz:
        assert npz["arr_0"].shape == (40, 4, 4, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["tokens"].shape == (40, 16) and npz["labels"].tolist() == [i % 10 for i in range(40)]
    assert result["metrics"] == saved["metrics"]

    # Second run: classifier, reference features and floor come from the cache; same seed -> same samples.
    clf_path = builtin_classifier("shapes", (4, 4), cache_dir=str(cache))
    stamp = os.path.getmtime(clf_path)
    cached = sorted(os.listdir(cache / "fidelity-cache"))
    assert any("heldout-n60" in name for name in cached), cached
    again = ev.main(argv + ["--out", str(tmp_path / "again.json")])
    assert os.path.getmtime(clf_path) == stamp
    assert again["metrics"]["fid"] == pytest.approx(saved["metrics"]["fid"], rel=1e-9)
    assert again["floor"] == saved["floor"]
    with np.load(tmp_path / "again.npz") as npz:
        again_tokens = npz["tokens"]
    with np.load(run / "eval.npz") as npz:
        assert np.array_equal(again_tokens, npz["tokens"])

    # torchrun: two gloo ranks sample half the labels each; rank 0 gathers, scores (cached classifier) and writes.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ranks.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           "-m", "models.evaluate", *common, "--num-samples", "21", "--no-floor", "--device", "cpu",
                           "--out", str(out)], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        ranked = json.load(f)
    assert ranked["world_size"] == 2 and ranked["n"] == 21 and "floor" not in ranked
    assert np.isfinite(ranked["metrics"]["fid"])
    assert os.path.getmtime(clf_path) == stamp
    with np.load(tmp_path / "ranks.npz") as npz:
        assert npz["tokens"].shape == (21, 16) and npz["labels"].tolist() == [i % 10 for i in range(21)]
        assert ((npz["tokens"] >= 0) & (npz["tokens"] < 8)).all()  # every row filled by one of the ranks


def test_inception_path_with_local_weights_and_adm_reference(tmp_path, tiny_run):
    """--inception-weights (a local file: here random weights in torch-fidelity's layout, nothing downloaded) and an
    ADM-format --ref-npz reference: the Inception metrics come out finite and the npz is the reference used.
    FID on the 64-d Inception features: the standard 2048-d ones cost ~15 s of eigenvalues here."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fi

    with mock.patch.object(fi, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None):
        inception = fi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pt"
    torch.save(inception.state_dict(), weights)
    ref = ev.tokens_to_images(ev.split_tokens("shapes", (4, 4), 0, 12, "heldout")[0], (4, 4))
    np.savez(tmp_path / "ref.npz", arr_0=ref.numpy())

    run, cache = tiny_run
    result = ev.evaluate(ev.parse_args([
        "--ckpt", str(run / "model.pt"), "--n", "10", "--n-ref", "12", "--kid-subsets", "5", "--no-floor",
        "--classifier-steps", "30", "--cache-dir", str(cache), "--inception-weights", str(weights),
        "--inception-layer", "64", "--ref-npz", str(tmp_path / "ref.npz"), "--out", str(tmp_path / "inception.json")]))
    for key in ("fid", "kid_mean", "isc_mean", "precision", "recall"):
        assert np.isfinite(result["inception"][key]), (key, result["inception"])
    assert any(name.startswith("refnpz-") for name in os.listdir(cache / "fidelity-cache"))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        ev.evaluate(ev.parse_args(["--ckpt", str(run / "model.pt"), "--n", "4", "--no-floor", "--cache-dir",
                                   str(cache), "--inception-weights", str(tmp_path / "missing.pt")]))
