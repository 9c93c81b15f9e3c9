"""LlamaGen VQ-16 tokenizer (names/shapes, strict loading, encode/decode) and the pre-extracted code dataset."""

import argparse
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.data.codes import LlamaGenCodes, code_dirs, write_item
from models.nets.vq import VQ_16, VQConfig, VQTokenizer

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny convolutions: intra-op threads only add synchronisation, which costs seconds on a loaded CI machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)



# --------------------------------------------------------------------------------------------------------------
# LlamaGen's VQ-16 parameter list, written from tokenizer/tokenizer_image/vq_model.py (ModelArgs defaults:
# codebook 16384 x 8, z_channels 256, ch 128, ch_mult [1, 1, 2, 2, 4], 2 res blocks, show_usage buffer of 65536).
LLAMAGEN_VQ16_TOTAL_KEYS = 344  # encoder 144 + decoder 194 + quantize 2 + quant_conv 2 + post_quant_conv 2
LLAMAGEN_VQ16_TABLE = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.conv_blocks.0.res.1.conv2.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.0.downsample.conv.weight": (128, 128, 3, 3),
    "encoder.conv_blocks.2.res.0.nin_shortcut.weight": (256, 128, 1, 1),
    "encoder.conv_blocks.4.res.0.norm1.weight": (256,),
    "encoder.conv_blocks.4.attn.1.q.weight": (512, 512, 1, 1),
    "encoder.mid.1.proj_out.bias": (512,),
    "encoder.mid.2.conv1.weight": (512, 512, 3, 3),
    "encoder.norm_out.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 3, 3),
    "quant_conv.weight": (8, 256, 1, 1),
    "quantize.embedding.weight": (16384, 8),
    "quantize.codebook_used": (65536,),
    "post_quant_conv.weight": (256, 8, 1, 1),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.mid.0.norm2.bias": (512,),
    "decoder.conv_blocks.0.attn.2.k.weight": (512, 512, 1, 1),
    "decoder.conv_blocks.0.upsample.conv.weight": (512, 512, 3, 3),
    "decoder.conv_blocks.1.res.0.nin_shortcut.weight": (256, 512, 1, 1),
    "decoder.conv_blocks.3.res.0.nin_shortcut.weight": (128, 256, 1, 1),
    "decoder.conv_blocks.4.res.2.conv2.weight": (128, 128, 3, 3),
    "decoder.norm_out.weight": (128,),
    "decoder.conv_out.weight": (3, 128, 3, 3),
}
ABSENT = ["decoder.conv_blocks.4.upsample.conv.weight", "encoder.conv_blocks.4.downsample.conv.weight",
          "encoder.conv_blocks.3.attn.0.q.weight", "encoder.conv_blocks.0.res.0.nin_shortcut.weight",
          "decoder.conv_blocks.0.res.3.conv1.weight"]


def llamagen_state_shapes(ch=128, mult=(1, 1, 2, 2, 4), z=256, n_codes=16384, dim=8, usage=65536, nres=2):
    """Every parameter name -> shape of LlamaGen's VQModel, enumerated from its source independently of
    models/nets/vq.py (the test's own reading of the architecture)."""
    out = {}

    def conv(name, cin, cout, k):
        out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name, c):
        out[f"{name}.weight"] = out[f"{name}.bias"] = (c,)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", c, c, 1)

    conv("encoder.conv_in", 3, ch, 3)
    c = ch
    for lvl, m in enumerate(mult):
        for r in range(nres):
            res(f"encoder.conv_blocks.{lvl}.res.{r}", c, ch * m)
            c = ch * m
            if lvl == len(mult) - 1:
                attn(f"encoder.conv_blocks.{lvl}.attn.{r}", c)
        if lvl != len(mult) - 1:
            conv(f"encoder.conv_blocks.{lvl}.downsample.conv", c, c, 3)
    res("encoder.mid.0", c, c), attn("encoder.mid.1", c), res("encoder.mid.2", c, c)
    norm("encoder.norm_out", c), conv("encoder.conv_out", c, z, 3)
    conv("quant_conv", z, dim, 1)
    out["quantize.embedding.weight"], out["quantize.codebook_used"] = (n_codes, dim), (usage,)
    conv("post_quant_conv", dim, z, 1)
    c = ch * mult[-1]
    conv("decoder.conv_in", z, c, 3)
    res("decoder.mid.0", c, c), attn("decoder.mid.1", c), res("decoder.mid.2", c, c)
    for j, lvl in enumerate(reversed(range(len(mult)))):
        for r in range(nres + 1):
            res(f"decoder.conv_blocks.{j}.res.{r}", c, ch * mult[lvl])
            c = ch * mult[lvl]
            if lvl == len(mult) - 1:
                attn(f"decoder.conv_blocks.{j}.attn.{r}", c)
        if lvl != 0:
            conv(f"decoder.conv_blocks.{j}.upsample.conv", c, c, 3)
    norm("decoder.norm_out", c), conv("decoder.conv_out", c, 3, 3)
    return out


SMALL = dict(ch=32, z_channels=32)  # VQ-16 topology (5 levels, downsample 16) at a quarter of the width


def small_state_dict(seed=0):
    shapes = llamagen_state_shapes(ch=32, z=32)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, s in shapes.items():
        if k.endswith("codebook_used"):
            sd[k] = torch.zeros(s)
        elif ".norm" in k or "norm_out" in k:
            sd[k] = (1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn(s, generator=g)
        elif k.endswith("weight") and len(s) == 4:
            sd[k] = torch.randn(s, generator=g) * (1.0 / (s[1] * s[2] * s[3])) ** 0.5
        else:
            sd[k] = 0.1 * torch.randn(s, generator=g)
    return sd


def test_vq16_names_and_shapes_match_llamagen():
    with torch.device("meta"):
        model = VQ_16()
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == LLAMAGEN_VQ16_TOTAL_KEYS
    for k, shape in LLAMAGEN_VQ16_TABLE.items():
        assert got[k] == shape, k
    for k in ABSENT:
        assert k not in got
    assert got == llamagen_state_shapes()
    assert 71e6 < sum(v.numel() for k, v in model.state_dict().items() if "codebook_used" not in k) < 73e6
    assert model.downsample == 16 and model.vocab_size == 16384


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("vq") / "vq_small.pt"
    sd = small_state_dict()
    # LlamaGen's training checkpoints also carry other entries, an argparse.Namespace among them
    torch.save({"model": sd, "steps": 10, "args": argparse.Namespace(vq_model="VQ-16")}, path)
    return str(path), sd


@pytest.fixture(scope="module")
def small_tok(small_ckpt):
    return VQTokenizer.from_checkpoint(small_ckpt[0], config=VQConfig(**SMALL))


def test_strict_load_keeps_every_tensor(small_ckpt, small_tok):
    _, sd = small_ckpt
    own = small_tok.state_dict()
    assert set(own) == set(sd)
    for k in sd:
        assert torch.equal(own[k], sd[k]), k
    assert not small_tok.training


def test_codebook_size_read_from_file(tmp_path):
    sd = small_state_dict()
    sd["quantize.embedding.weight"] = torch.randn(100, 8)
    path = tmp_path / "c.pt"
    torch.save({"model": sd}, path)
    cfg = VQConfig(**SMALL)
    with pytest.raises(ValueError, match="shape mismatches.*quantize.embedding.weight"):
        VQTokenizer.from_checkpoint(str(path), config=cfg)
    # without an explicit config the codebook comes from the file; widths from the preset (full VQ-16 here)
    with pytest.raises(ValueError, match="shape mismatches"):
        VQTokenizer.from_checkpoint(str(path))


def test_encode_is_nearest_normalised_codebook_entry(small_tok):
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 48) * 2 - 1
    codes = small_tok.encode(images)
    assert codes.shape == (2, (64 // 16) * (48 // 16)) and codes.dtype == torch.int64
    z = small_tok.latents(images)  # (B, 8, 4, 3)
    assert z.shape == (2, 8, 4, 3)
    zf = F.normalize(z.permute(0, 2, 3, 1).reshape(2, -1, 8).double(), dim=-1)
    book = F.normalize(small_tok.quantize.embedding.weight.double(), dim=-1)
    cos = zf @ book.T
    best = cos.max(-1).values
    chosen = cos.gather(-1, codes[..., None]).squeeze(-1)
    assert torch.allclose(chosen, best, atol=1e-6)  # the chosen entry is (one of) the most similar
    assert codes.unique().numel() > 1
    # raster order: code (r, c) is latent position (r, c)
    single = small_tok.encode(images[:1])
    assert torch.equal(single, codes[:1])


def test_lookup_ignores_codebook_scale(small_ckpt):
    path, sd = small_ckpt
    tok = VQTokenizer.from_checkpoint(path, config=VQConfig(**SMALL))
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    codes = tok.encode(images)
    out = tok.decode(codes, (2, 2), clamp=False)
    with torch.no_grad():
        tok.quantize.embedding.weight.mul_(torch.rand(tok.config.codebook_size, 1) * 5 + 0.1)
    assert torch.equal(tok.encode(images), codes)
    assert torch.allclose(tok.decode(codes, (2, 2), clamp=False), out, atol=1e-5)


def test_decode_shapes_and_range(small_tok):
    codes = torch.randint(0, 16384, (3, 4 * 2))
    out = small_tok.decode(codes, (4, 2))
    assert out.shape == (3, 3, 64, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    raw = small_tok.decode(codes, (4, 2), clamp=False)
    assert torch.equal(raw.clamp(-1, 1), out)
    assert not torch.equal(out[0], out[1])
    # round trip: decoded images re-encode to a code grid of the same shape
    again = small_tok.encode(out)
    assert again.shape == codes.shape
    # decoding uses the normalised codebook entry of each code
    q = F.normalize(small_tok.quantize.embedding.weight, dim=-1)[codes[:1]].reshape(1, 4, 2, 8).permute(0, 3, 1, 2)
    with torch.no_grad():
        manual = small_tok.decoder(small_tok.post_quant_conv(q.contiguous()))
    assert torch.allclose(manual, raw[:1], atol=1e-5)


def test_attention_block_matches_explicit_formula(small_tok):
    blk = small_tok.encoder.mid[1]
    x = torch.randn(2, 128, 3, 5)
    with torch.no_grad():
        h = blk.norm(x)
        q, k, v = (m(h).flatten(2) for m in (blk.q, blk.k, blk.v))  # (B, C, N)
        w = torch.softmax(q.transpose(1, 2) @ k / 128 ** 0.5, dim=-1)  # (B, Nq, Nk)
        ref = x + blk.proj_out((v @ w.transpose(1, 2)).reshape(2, 128, 3, 5))
        assert torch.allclose(blk(x), ref, atol=1e-5)


def test_downsample_pads_bottom_right_only():
    tok = VQTokenizer(VQConfig(**SMALL))
    down = tok.encoder.conv_blocks[0].downsample
    with torch.no_grad():
        down.conv.weight.zero_(), down.conv.bias.zero_()
        for c in range(32):
            down.conv.weight[c, c, 0, 0] = 1.0  # the top-left tap
        x = torch.randn(1, 32, 8, 8)
        y = down(x)
    assert y.shape == (1, 32, 4, 4)
    assert torch.equal(y, x[:, :, ::2, ::2])  # no padding on the top/left


def test_checkpoint_errors(tmp_path, small_ckpt):
    cfg = VQConfig(**SMALL)
    with pytest.raises(FileNotFoundError, match="not found"):
        VQTokenizer.from_checkpoint(str(tmp_path / "nope.pt"), config=cfg)
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"definitely not a checkpoint" * 10)
    with pytest.raises(ValueError, match="not a readable"):
        VQTokenizer.from_checkpoint(str(bad), config=cfg)
    good = open(small_ckpt[0], "rb").read()
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        VQTokenizer.from_checkpoint(str(trunc), config=cfg)

    sd = dict(small_ckpt[1])
    sd.pop("decoder.conv_out.bias")
    sd["decoder.conv_out.extra"] = torch.zeros(1)
    p = tmp_path / "keys.pt"
    torch.save({"model": sd}, p)
    with pytest.raises(ValueError, match=r"1 missing: decoder.conv_out.bias; 1 unexpected: decoder.conv_out.extra"):
        VQTokenizer.from_checkpoint(str(p), config=cfg)

    torch.save({"optimizer": {}}, p)
    with pytest.raises(ValueError, match="no 'model' entry"):
        VQTokenizer.from_checkpoint(str(p), config=cfg)
    torch.save([1, 2], p)
    with pytest.raises(ValueError, match="expected a dict"):
        VQTokenizer.from_checkpoint(str(p), config=cfg)
    # the full VQ-16 architecture does not accept the small model's weights
    with pytest.raises(ValueError, match="shape mismatches"):
        VQTokenizer.from_checkpoint(small_ckpt[0])
    with pytest.raises(ValueError, match="unknown VQ preset"):
        VQTokenizer.from_checkpoint(small_ckpt[0], preset="VQ-32")


def test_bare_and_prefixed_state_dicts_load(tmp_path, small_ckpt):
    sd = small_ckpt[1]
    p = tmp_path / "bare.pt"
    torch.save({"module." + k: v for k, v in sd.items()}, p)
    tok = VQTokenizer.from_checkpoint(str(p), config=VQConfig(**SMALL))
    assert torch.equal(tok.quantize.embedding.weight, sd["quantize.embedding.weight"])


def test_encode_decode_bad_inputs(small_tok):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        small_tok.encode(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="multiples of 16"):
        small_tok.encode(torch.zeros(1, 3, 40, 32))
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        small_tok.encode(torch.full((1, 3, 32, 32), 255.0))
    with pytest.raises(ValueError, match="floating point"):
        small_tok.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 16384\)"):
        small_tok.decode(torch.full((1, 4), 16384), 2)
    with pytest.raises(ValueError, match="do not fill a 3x3 grid"):
        small_tok.decode(torch.zeros(1, 4, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="integer"):
        small_tok.decode(torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match="multiple of 32"):
        VQTokenizer(VQConfig(ch=16))


# --------------------------------------------------------------------------------------------------------------
# Pre-extracted codes
N_IMG, CROPS, GRID, Z = 6, 10, 4, 5


def make_codes(root, n=N_IMG, crops=CROPS, grid=GRID, features=True, feat_dtype=np.float16):
    """Synthetic LlamaGen extraction output: crop a of image i has every code = 100*i + a (identifiable)."""
    codes_dir, labels_dir = code_dirs(str(root))
    feat_dir = os.path.join(str(root), "feats") if features else None
    rng = np.random.default_rng(0)
    truth = []
    for i in range(n):
        codes = np.stack([np.full(grid * grid, 100 * i + a) for a in range(crops)])
        codes[:, 0] = rng.integers(0, 16384, crops)  # varied first code
        feats = rng.standard_normal((crops, grid * grid, Z)).astype(feat_dtype) if features else None
        write_item(i, codes_dir, labels_dir, codes, (7 * i) % 1000, features_dir=feat_dir, features=feats)
        truth.append((codes, (7 * i) % 1000, feats))
    return codes_dir, labels_dir, feat_dir, truth


def test_llamagen_file_layout(tmp_path):
    codes_dir, labels_dir, _, _ = make_codes(tmp_path, n=1, features=False)
    assert codes_dir.endswith("imagenet256_codes") and labels_dir.endswith("imagenet256_labels")
    c, lab = np.load(os.path.join(codes_dir, "0.npy")), np.load(os.path.join(labels_dir, "0.npy"))
    assert c.shape == (1, CROPS, GRID * GRID) and c.dtype == np.int64  # as extract_codes_c2i.py saves
    assert lab.shape == (1,) and lab.dtype == np.int64


def test_fixed_crop_items(tmp_path):
    codes_dir, labels_dir, _, truth = make_codes(tmp_path, features=False)
    ds = LlamaGenCodes(codes_dir, labels_dir, crop=3)
    assert len(ds) == N_IMG and (ds.height, ds.width) == (GRID, GRID)
    assert ds.vocab_size == 16384 and ds.num_classes == 1000 and ds.num_crops == CROPS
    for i in range(N_IMG):
        tokens, label = ds[i]
        assert tokens.dtype == torch.int64 and tokens.shape == (GRID * GRID,)
        assert torch.equal(tokens, torch.from_numpy(truth[i][0][3])) and label == truth[i][1]
    assert torch.equal(ds[-1][0], ds[N_IMG - 1][0])
    with pytest.raises(IndexError):
        ds[N_IMG]
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    tokens, labels = next(iter(loader))
    assert tokens.shape == (4, GRID * GRID) and labels.tolist() == [0, 7, 14, 21]


def test_random_and_seeded_crops(tmp_path):
    codes_dir, labels_dir, _, truth = make_codes(tmp_path, features=False)
    ds = LlamaGenCodes(codes_dir, labels_dir)  # random, LlamaGen's behaviour
    seen = {int(ds[2][0][1]) - 200 for _ in range(60)}
    assert len(seen) > 3 and seen <= set(range(CROPS))

    a = LlamaGenCodes(codes_dir, labels_dir, crop="seeded", seed=5)
    b = LlamaGenCodes(codes_dir, labels_dir, crop="seeded", seed=5)
    picks_a = [int(a[i][0][1]) % 100 for i in range(N_IMG)]
    assert picks_a == [int(b[i][0][1]) % 100 for i in range(N_IMG)]
    assert picks_a == [int(a[i][0][1]) % 100 for i in range(N_IMG)]  # stable within an epoch
    epochs = set()
    for e in range(6):
        a.set_epoch(e)
        epochs.add(tuple(int(a[i][0][1]) % 100 for i in range(N_IMG)))
    assert len(epochs) > 1
    other = LlamaGenCodes(codes_dir, labels_dir, crop="seeded", seed=6)
    assert picks_a != [int(other[i][0][1]) % 100 for i in range(N_IMG)]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_feature_cache_follows_the_crop(tmp_path, dtype):
    codes_dir, labels_dir, feat_dir, truth = make_codes(tmp_path, feat_dtype=dtype)
    ds = LlamaGenCodes(codes_dir, labels_dir, features_dir=feat_dir)
    for _ in range(3):
        for i in range(N_IMG):
            tokens, label, feats = ds[i]
            crop = int(tokens[1]) - 100 * i
            assert feats.shape == (GRID * GRID, Z) and feats.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype
            assert torch.equal(feats, torch.from_numpy(truth[i][2][crop]))
    tokens, labels, feats = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert feats.shape == (3, GRID * GRID, Z)


def test_other_code_shapes_and_grid(tmp_path):
    codes_dir, labels_dir = str(tmp_path / "c"), str(tmp_path / "l")
    os.makedirs(codes_dir), os.makedirs(labels_dir)
    np.save(os.path.join(codes_dir, "0.npy"), np.arange(24).reshape(2, 12))  # (crops, H*W)
    np.save(os.path.join(codes_dir, "1.npy"), np.arange(24).reshape(2, 12) + 1)
    for i in range(2):
        np.save(os.path.join(labels_dir, f"{i}.npy"), np.array([i]))
    with pytest.raises(ValueError, match="not a square grid"):
        LlamaGenCodes(codes_dir, labels_dir)
    ds = LlamaGenCodes(codes_dir, labels_dir, grid=(3, 4), crop=1)
    assert torch.equal(ds[1][0], torch.arange(12, 24) + 1)
    with pytest.raises(ValueError, match="grid 4x4 != 12"):
        LlamaGenCodes(codes_dir, labels_dir, grid=4)
    np.save(os.path.join(codes_dir, "1.npy"), np.arange(12))  # (H*W,): a single crop
    one = LlamaGenCodes(codes_dir, labels_dir, grid=(3, 4), crop="seeded")
    assert torch.equal(one[1][0], torch.arange(12))
    with pytest.raises(ValueError, match="crop 1 requested"):
        LlamaGenCodes(codes_dir, labels_dir, grid=(3, 4), crop=1)[1]


def test_code_dataset_errors(tmp_path):
    codes_dir, labels_dir, feat_dir, _ = make_codes(tmp_path)
    with pytest.raises(FileNotFoundError, match="codes directory not found"):
        LlamaGenCodes(str(tmp_path / "missing"), labels_dir)
    with pytest.raises(FileNotFoundError, match="labels directory not found"):
        LlamaGenCodes(codes_dir, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="crop must be"):
        LlamaGenCodes(codes_dir, labels_dir, crop="center")
    with pytest.raises(ValueError, match="crop=10 but the files hold 10 crops"):
        LlamaGenCodes(codes_dir, labels_dir, crop=10)
    with pytest.raises(ValueError, match="size=7 but there are 6"):
        LlamaGenCodes(codes_dir, labels_dir, size=7)
    assert len(LlamaGenCodes(codes_dir, labels_dir, size=2)) == 2

    os.remove(os.path.join(feat_dir, "5.npy"))
    with pytest.raises(ValueError, match="5 feature files .* but 6 code files"):
        LlamaGenCodes(codes_dir, labels_dir, features_dir=feat_dir)
    np.save(os.path.join(feat_dir, "5.npy"), np.zeros((CROPS - 1, GRID * GRID, Z), np.float16))
    ds = LlamaGenCodes(codes_dir, labels_dir, features_dir=feat_dir, crop=0)
    with pytest.raises(ValueError, match="one \\(H\\*W, Z\\) block per crop"):
        ds[5]
    np.save(os.path.join(feat_dir, "5.npy"), np.zeros((CROPS, GRID * GRID, Z), np.int32))
    with pytest.raises(ValueError, match="float16 or float32"):
        ds[5]

    os.remove(os.path.join(labels_dir, "5.npy"))
    with pytest.raises(ValueError, match="6 code files .* but 5 label files"):
        LlamaGenCodes(codes_dir, labels_dir)
    os.remove(os.path.join(codes_dir, "5.npy"))
    os.remove(os.path.join(codes_dir, "2.npy"))
    with pytest.raises(ValueError, match=r"not numbered 0..n-1 .*missing e.g. \[2\]"):
        LlamaGenCodes(codes_dir, labels_dir)

    np.save(os.path.join(codes_dir, "2.npy"), np.full((1, CROPS, GRID * GRID), 16384))
    ds = LlamaGenCodes(codes_dir, labels_dir, crop=0)
    with pytest.raises(ValueError, match=r"outside \[0, 16384\)"):
        ds[2]
    np.save(os.path.join(codes_dir, "2.npy"), np.zeros((1, CROPS, 9), np.int64))
    with pytest.raises(ValueError, match="holds 9 codes per crop, expected 16"):
        ds[2]
    with open(os.path.join(codes_dir, "2.npy"), "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match="unreadable .npy"):
        ds[2]
    np.save(os.path.join(labels_dir, "1.npy"), np.array([1000]))
    with pytest.raises(ValueError, match=r"label 1000 outside \[0, 1000\)"):
        ds[1]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no \\{i\\}.npy files"):
        LlamaGenCodes(str(empty), labels_dir)


def test_write_item_checks(tmp_path):
    with pytest.raises(ValueError, match="codes must be"):
        write_item(0, str(tmp_path / "c"), str(tmp_path / "l"), np.zeros(16), 0)
    with pytest.raises(ValueError, match="features must be"):
        write_item(0, str(tmp_path / "c"), str(tmp_path / "l"), np.zeros((2, 16)), 0,
                   features_dir=str(tmp_path / "f"), features=np.zeros((2, 15, 3)))
