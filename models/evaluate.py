"""Evaluate a trained GPT: sample through the KV-cache sampler, then FID / KID / IS / precision-recall and the
structure metric, with the data's own floor beside them.

    python -m models.evaluate --ckpt runs/x/model.pt --n 1000
    torchrun --nproc_per_node 8 -m models.evaluate --ckpt ... --num-samples 50000   # sampling sharded

Metrics (all from **torch-fidelity** 0.4, offline, ``cuda=False`` on CPU), computed between ``--n`` samples and a
held-out reference split of the training data (same class balance: labels cycle through the classes in both):

- ``fid``, ``kid_mean``/``kid_std`` (polynomial-kernel unbiased MMD over ``--kid-subsets`` subsets of
  min(1000, N/2) images), ``precision``/``recall``/``f_score`` (k-NN manifolds, k = 3, Kynkäänniemi et al. 2019)
  on the 64-d penultimate features of the project's own classifier (:mod:`models.nets.classifier`, registered with
  torch-fidelity as a feature extractor, trained on first use and cached under ``--cache-dir``), and
  ``isc_mean``/``isc_std`` (Inception Score, at most the number of classes) on its logits. The reference
  features/statistics are cached by torch-fidelity (keyed by data, grid, seed, size and the classifier's hash).
- ``structure``: the fraction of samples whose token grid obeys their class's rule
  (:func:`models.data.shapes.satisfies_rule`; the data itself scores 1.0), also per class. Needs no network.
- ``floor``: the same metrics for ``--n`` images of the *training* split against the same reference, i.e. what a
  perfect model (one that reproduces the data distribution) would score at this sample size: every FID has its
  floor beside it. Cached in ``--cache-dir``.
- ``inception`` (only with ``--inception-weights``, a local file of torch-fidelity's ``inception-v3-compat``
  weights; nothing is downloaded): FID/KID/IS/PRC on Inception features. With ``--ref-npz`` (an ADM-format
  reference batch, ``arr_0`` = (N, H, W, 3) uint8, e.g. ImageNet-256's) it is the reference instead of the held-out
  split, and ``--vq-ckpt`` decodes ImageNet codes to pixels, so such numbers compare with the paper's.

Under ``torchrun`` each rank samples its share of the labels (rank ``r``: every ``world``-th, from its own seeded
stream) and rank 0 gathers them, scores and writes. In-process (the convergence study, every few steps): build
one :class:`Scorer` (classifier and reference features set up once), then call
``scorer.score(sample_tokens(model, labels, ...), labels)``; ``scorer.floor(n)`` once.

Outputs: a JSON of everything (default ``<ckpt dir>/eval.json``) and an ``.npz`` of the samples usable by other
evaluators (default next to the JSON): ``arr_0`` (N, H, W, 3) uint8 images (the ADM evaluator's layout), ``tokens``
(N, H*W) int64 and ``labels`` (N,).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch.utils.data import Dataset

from .cli import (UsageError, add_model_source_args, add_sampling_args, check_sampling_request, device, init_distributed,
                  int_at_least, load_model, positive_int, run_main, sampling_kwargs, sampling_seed, train_seed)
from .data.shapes import CLASS_NAMES, build_dataset, satisfies_rule
from .data.tokenizer import PaletteTokenizer
from .nets.classifier import builtin_classifier, file_digest, load_classifier, register_with_torch_fidelity
from .sampling.generate import generate


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_source_args(p)  # --ckpt, or a LlamaGen --gpt-ckpt with its flags
    p.add_argument("--n", "--num-samples", dest="n", type=int_at_least(2), default=1000, help="number of samples "
                   "(under torchrun spell it --num-samples: torchrun's own parser takes --n for a prefix of its "
                   "options)")
    p.add_argument("--n-ref", type=int_at_least(2), default=None, help="reference (held-out) images; default: --n")
    p.add_argument("--data", default="shapes", help="the data the model was trained on (built-in: shapes)")
    p.add_argument("--data-seed", type=train_seed, default=0, help="the training run's --seed: train split = this "
                   "seed, reference = its held-out split")
    add_sampling_args(p)
    p.add_argument("--seed", type=sampling_seed, default=0, help="sampling seed")
    p.add_argument("--batch-size", type=positive_int, default=250, help="sampling batch")
    p.add_argument("--out", default=None, help="JSON path (default: <ckpt dir>/eval.json)")
    p.add_argument("--npz", default=None, help="samples .npz path (default: the JSON path with .npz)")
    p.add_argument("--cache-dir", default=os.path.join("runs", "eval"), help="classifier, reference features, floor")
    p.add_argument("--classifier", default=None, help="a local classifier file (default: the built-in one, trained "
                   "on first use and cached in --cache-dir)")
    p.add_argument("--classifier-steps", type=positive_int, default=400,
                   help="training steps of the built-in classifier")
    p.add_argument("--kid-subsets", type=positive_int, default=100)
    p.add_argument("--no-floor", action="store_true", help="skip the train-vs-held-out reference numbers")
    p.add_argument("--inception-weights", default=None, help="local torch-fidelity inception-v3-compat weights "
                   "file: adds Inception-feature metrics (never downloaded)")
    p.add_argument("--inception-layer", default="2048", choices=("64", "192", "768", "2048"),
                   help="Inception feature for FID/KID/PRC (2048: the standard pool features)")
    p.add_argument("--ref-npz", default=None, help="ADM-format reference batch (arr_0: (N, H, W, 3) uint8) for the "
                   "Inception metrics instead of the held-out split; needs --inception-weights")
    p.add_argument("--vq-ckpt", default=None, help="a local LlamaGen VQ checkpoint to decode ImageNet codes to pixels "
                   "(Inception metrics only)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


class ImageSet(Dataset):
    """torch-fidelity input: ``(N, H, W, 3)`` uint8 images served as ``(3, H, W)`` uint8 tensors."""

    def __init__(self, images: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"ImageSet expects (N, H, W, 3) uint8 images, got {tuple(images.shape)} {images.dtype}")
        self.images = images.permute(0, 3, 1, 2).contiguous()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def class_labels(n: int, num_classes: int) -> torch.Tensor:
    """Labels cycling through the classes, the class balance of the built-in data's splits."""
    return torch.arange(n) % num_classes


@torch.no_grad()
def sample_tokens(model, labels: torch.Tensor, *, batch_size: int = 250, seed: int = 0, **sampling) -> torch.Tensor:
    """``(N, H*W)`` int64 tokens for ``labels`` (N,), sampled in batches through :func:`models.sampling.generate.generate`
    (``sampling``: cfg_scale, temperature, top_k, top_p); reproducible from ``seed``."""
    device = model.output.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.cat([generate(model, labels[i: i + batch_size], generator=generator, **sampling).cpu()
                      for i in range(0, len(labels), batch_size)])


def tokens_to_images(tokens: torch.Tensor, grid) -> torch.Tensor:
    """(N, H*W) palette tokens -> (N, H, W, 3) uint8."""
    return PaletteTokenizer().decode(tokens, grid)


def structure_metric(tokens: torch.Tensor, labels: torch.Tensor, grid) -> dict:
    """Fraction of token grids that obey their class's rule (:func:`models.data.shapes.satisfies_rule`), overall and per
    class name."""
    height, width = (grid, grid) if isinstance(grid, int) else tuple(grid)
    ok = torch.tensor([satisfies_rule(t.view(height, width), int(l)) for t, l in zip(tokens, labels)])
    per_class = {CLASS_NAMES[c]: float(ok[labels == c].float().mean()) for c in labels.unique().tolist()}
    return {"structure": float(ok.float().mean()), "structure_per_class": per_class}


def fidelity_metrics(generated: torch.Tensor, reference: torch.Tensor, *, feature_extractor: str,
                     weights_path: str, cache_root: str | None = None, reference_cache_name: str | None = None,
                     generated_cache_name: str | None = None, kid_subsets: int = 100,
                     kid_subset_size: int | None = None, feature_layer: str | None = None, seed: int = 2020,
                     batch_size: int = 500) -> dict:
    """torch-fidelity's FID, KID, IS (of ``generated``) and precision/recall between two (N, H, W, 3) uint8 image
    sets, on ``feature_extractor`` (a registered name) with weights from the local file ``weights_path``.
    ``*_cache_name``: cache that input's features under ``cache_root`` (use for fixed sets only, with a name that
    changes whenever the images or the extractor weights do). KID subsets default to 1000 images (the usual size)
    or half the smaller set, so that ``kid_std`` measures something when the sets hold fewer than 2000 images.
    ``feature_layer``: the extractor's feature for FID/KID/PRC (default: the extractor's own choice)."""
    import torch_fidelity

    n_min = min(len(generated), len(reference))
    if n_min < 2:
        raise ValueError("fidelity metrics need at least 2 images on each side")
    metrics = torch_fidelity.calculate_metrics(
        input1=ImageSet(generated), input2=ImageSet(reference), cuda=False, batch_size=batch_size,
        isc=True, fid=True, kid=True, prc=True, feature_extractor=feature_extractor,
        feature_extractor_weights_path=weights_path, kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size or min(1000, max(2, n_min // 2)),
        isc_splits=max(1, min(10, len(generated) // 10)), prc_neighborhood=min(3, n_min - 1),
        feature_layer_fid=feature_layer, feature_layer_kid=feature_layer, feature_layer_prc=feature_layer,
        cache=cache_root is not None, cache_root=cache_root, input1_cache_name=generated_cache_name,
        input2_cache_name=reference_cache_name, rng_seed=seed, save_cpu_ram=True, verbose=False,
    )
    names = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid_mean",
             "kernel_inception_distance_std": "kid_std", "inception_score_mean": "isc_mean",
             "inception_score_std": "isc_std"}
    return {names.get(k, k): float(v) for k, v in metrics.items()}


def split_tokens(data: str, grid, seed: int, n: int, split: str):
    """The first ``n`` images of a split of the built-in data: (tokens (n, H*W), labels (n,))."""
    dataset = build_dataset(data, size=n, grid=grid, seed=seed, split=split)
    if len(dataset) < n:
        raise ValueError(f"the {split} split of {data} has only {len(dataset)} images (asked for {n})")
    items = [dataset[i] for i in range(n)]
    return torch.stack([t for t, _ in items]), torch.tensor([int(l) for _, l in items])


class Scorer:
    """Scores palette-token samples of the built-in data against its held-out split, set up once and reused: the
    classifier is trained (or loaded) and the reference features cached on construction, so the convergence study
    can call :meth:`score` every few steps and :meth:`floor` once.

    Arguments: ``data`` / ``grid`` / ``data_seed`` name the training data (reference = the first ``n_ref`` images
    of its held-out split); ``classifier``: a local classifier file (default: the built-in one for ``data`` at
    ``grid``, trained with ``classifier_steps`` on first use and cached in ``cache_dir``)."""

    def __init__(self, data: str = "shapes", grid=(8, 8), *, data_seed: int = 0, n_ref: int = 1000,
                 num_classes: int | None = None, cache_dir: str = os.path.join("runs", "eval"),
                 classifier: str | None = None, classifier_steps: int = 400, kid_subsets: int = 100, seed: int = 0):
        self.data, self.grid, self.data_seed, self.n_ref = data, tuple(grid), data_seed, n_ref
        self.cache_dir, self.kid_subsets, self.seed = cache_dir, kid_subsets, seed
        self.classifier = classifier or builtin_classifier(data, self.grid, cache_dir=cache_dir,
                                                           steps=classifier_steps)
        clf = load_classifier(self.classifier)
        if tuple(clf.grid) != self.grid or (num_classes is not None and clf.config["num_classes"] != num_classes):
            raise ValueError(f"classifier {self.classifier} is for {clf.grid} grids / {clf.config['num_classes']} "
                             f"classes; the samples are {self.grid} / {num_classes}")
        self.digest = file_digest(self.classifier)
        self.ref_images = tokens_to_images(split_tokens(data, self.grid, data_seed, n_ref, "heldout")[0], self.grid)
        self.ref_name = f"{data}-{self.grid[0]}x{self.grid[1]}-seed{data_seed}-heldout-n{n_ref}-clf{self.digest}"

    def score(self, tokens: torch.Tensor, labels: torch.Tensor, seed: int | None = None) -> dict:
        """torch-fidelity metrics of (N, H*W) tokens against the reference, and their structure (``shapes``)."""
        out = fidelity_metrics(tokens_to_images(tokens, self.grid), self.ref_images,
                               feature_extractor=register_with_torch_fidelity(), weights_path=self.classifier,
                               cache_root=os.path.join(self.cache_dir, "fidelity-cache"),
                               reference_cache_name=self.ref_name, kid_subsets=self.kid_subsets,
                               seed=self.seed if seed is None else seed)
        if self.data == "shapes":
            out.update(structure_metric(tokens, labels, self.grid))
        return out

    def floor(self, n: int) -> dict:
        """:meth:`score` of ``n`` training-split images: what a model that reproduces the data would get at this
        sample size (cached as JSON in ``cache_dir``)."""
        key = f"floor-n{n}-{self.ref_name}-kid{self.kid_subsets}"
        path = os.path.join(self.cache_dir, key + ".json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
        tokens, labels = split_tokens(self.data, self.grid, self.data_seed, n, "train")
        floor = {**self.score(tokens, labels, seed=self.data_seed), "n": n}
        os.makedirs(self.cache_dir, exist_ok=True)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(floor, f, indent=1)
        os.replace(tmp, path)
        return floor


def inception_metrics(images: torch.Tensor, args, ref_images: torch.Tensor | None) -> dict:
    """FID/KID/IS/PRC on torch-fidelity's Inception (``inception-v3-compat``) from the local ``--inception-weights``;
    the reference is ``--ref-npz``'s ``arr_0`` when given, else ``ref_images``."""
    if not os.path.isfile(args.inception_weights):
        raise FileNotFoundError(f"--inception-weights: no such file {args.inception_weights} (nothing is downloaded)")
    ref_name = None
    if args.ref_npz:
        with np.load(args.ref_npz) as batch:
            if "arr_0" not in batch:
                raise ValueError(f"--ref-npz {args.ref_npz}: no arr_0 (an ADM reference batch holds its images there)")
            ref_images = torch.from_numpy(batch["arr_0"])
        ref_name = f"refnpz-{file_digest(args.ref_npz)}-inception-{file_digest(args.inception_weights)}"
    import torch_fidelity  # noqa: F401  (registers inception-v3-compat)

    return fidelity_metrics(images, ref_images, feature_extractor="inception-v3-compat",
                            weights_path=args.inception_weights, cache_root=os.path.join(args.cache_dir,
                                                                                         "fidelity-cache"),
                            reference_cache_name=ref_name, kid_subsets=args.kid_subsets, seed=args.seed,
                            feature_layer=args.inception_layer, batch_size=64)


def gather_shards(mine: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Reassemble rank-interleaved shards (rank r holds rows r, r + world, ...) into the (n, ...) whole on every
    rank (``all_gather_object``: works over gloo and NCCL alike, and shards may differ in length by one)."""
    if world == 1:
        return mine
    import torch.distributed as dist

    shards = [None] * world
    dist.all_gather_object(shards, mine.cpu())
    # Every rank leaves the group now: scoring is rank 0's alone, and a rank that exits while the group is still
    # up can tear down its peers' transport mid-run.
    dist.barrier()
    dist.destroy_process_group()
    return interleave(shards, n)


def interleave(shards, n: int) -> torch.Tensor:
    """Inverse of ``[whole[r::world] for r in range(world)]``."""
    whole = shards[0].new_empty((n, *shards[0].shape[1:]))
    for r, shard in enumerate(shards):
        whole[r::len(shards)] = shard
    return whole


def evaluate(args) -> dict:
    """Sample, score, write the JSON and the ``.npz``; returns the JSON's dict."""
    if args.n < 2:
        raise ValueError("--n must be at least 2")
    if args.ref_npz and not args.inception_weights:
        raise ValueError("--ref-npz is an Inception-feature reference: pass --inception-weights too")
    for flag, path in (("--inception-weights", args.inception_weights), ("--ref-npz", args.ref_npz),
                       ("--classifier", args.classifier), ("--vq-ckpt", args.vq_ckpt)):
        if path and not os.path.isfile(path):  # before minutes of sampling, not after
            raise FileNotFoundError(f"{flag}: no such file {path} (nothing is downloaded)")
    for flag, path in (("--out", args.out), ("--npz", args.npz)):
        if path and os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a directory: pass the file's path")
    n_ref = args.n_ref or args.n
    t0 = time.perf_counter()
    rank, world, device = init_distributed(args.device)
    model = load_model(args, device)
    check_sampling_request(model, cfg=args.cfg)  # before minutes of sampling
    config = model.config
    grid = tuple(config.grid)
    labels = class_labels(args.n, config.num_classes)
    sampling = sampling_kwargs(args)
    # Rank r samples labels[r::world] from its own stream (rank 0's is the single-process stream).
    mine = sample_tokens(model, labels[rank::world], batch_size=args.batch_size, seed=args.seed + 1_000_003 * rank,
                         **sampling)
    del model
    tokens = gather_shards(mine, args.n, world)
    sample_s = time.perf_counter() - t0
    if rank != 0:  # rank 0 scores and writes; the others are done once their shard is in
        return {"rank": rank}

    result = {"ckpt": os.path.abspath(args.ckpt or args.gpt_ckpt), "n": args.n, "n_ref": n_ref, "data": args.data,
              "data_seed": args.data_seed, "grid": list(grid), "sampling": {**sampling, "seed": args.seed},
              "world_size": world, "sample_s": round(sample_s, 2)}
    if args.vq_ckpt:
        from .nets.vq import VQTokenizer

        vq = VQTokenizer.from_checkpoint(args.vq_ckpt)
        with torch.no_grad():
            pixels = torch.cat([vq.decode(tokens[i: i + 16], grid) for i in range(0, len(tokens), 16)])
        images = ((pixels + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1)
    else:
        if config.vocab_size != PaletteTokenizer().vocab_size:
            raise ValueError(f"this model has a {config.vocab_size}-token vocabulary; the palette tokenizer decodes "
                             f"{PaletteTokenizer().vocab_size}: pass --vq-ckpt (with --inception-weights)")
        images = tokens_to_images(tokens, grid)
        scorer = Scorer(args.data, grid, data_seed=args.data_seed, n_ref=n_ref, num_classes=config.num_classes,
                        cache_dir=args.cache_dir, classifier=args.classifier, classifier_steps=args.classifier_steps,
                        kid_subsets=args.kid_subsets, seed=args.seed)
        t1 = time.perf_counter()
        result["metrics"] = scorer.score(tokens, labels)
        result["metrics_s"] = round(time.perf_counter() - t1, 2)
        result["feature_extractor"] = {"name": "project classifier (models.nets.classifier)",
                                       "path": os.path.abspath(scorer.classifier), "digest": scorer.digest}
        if not args.no_floor:
            result["floor"] = scorer.floor(args.n)
    if args.inception_weights:
        ref = None if args.ref_npz else tokens_to_images(split_tokens(args.data, grid, args.data_seed, n_ref,
                                                                      "heldout")[0], grid)
        result["inception"] = inception_metrics(images, args, ref)

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt or args.gpt_ckpt)), "eval.json")
    npz = args.npz or os.path.splitext(out)[0] + ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(npz, arr_0=images.numpy(), tokens=tokens.numpy(), labels=labels.numpy())
    result.update(npz=os.path.abspath(npz), total_s=round(time.perf_counter() - t0, 2))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    result["json"] = os.path.abspath(out)
    return result


def main(argv=None):
    result = evaluate(parse_args(argv))
    if result.get("rank", 0) != 0:
        return result
    metrics, floor = result.get("metrics", {}), result.get("floor", {})
    for key in ("fid", "kid_mean", "isc_mean", "precision", "recall", "structure"):
        if key in metrics:
            beside = f"   (data floor {floor[key]:.4g})" if key in floor else ""
            print(f"{key:>10}: {metrics[key]:.4g}{beside}")
    if "inception" in result:
        print(f"inception: {json.dumps(result['inception'])}")
    print(f"wrote {result['json']} and {result['npz']} ({result['n']} samples, {result['total_s']} s)")
    return result


if __name__ == "__main__":
    run_main(main, "models.evaluate")
