"""DINOv2 encoder (models/nets/dinov2.py) and the per-crop Mirai-I feature extraction (models/extract_features.py).

The key table below is written from facebookresearch/dinov2 (vision_transformer.py + layers/, hub/backbones.py:
img_size 518, patch 14, LayerScale, block_chunks=0, ViT-g with the fused SwiGLU FFN, 4 registers for *_reg), not
from our module, so a renamed or reshaped parameter fails here. Models in these tests are tiny (meta-device tables
for the real sizes), so the file runs in seconds on CPU.
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import extract_features as ef
from models.nets.dinov2 import DinoV2, dinov2_config, imagenet_preprocess, state_dict_shapes

TINY = dict(embed_dim=32, depth=2, num_heads=4)


def expected_keys(d, depth, *, grid=37, registers=0, ffn_hidden=None, swiglu=False):
    """The hub checkpoint's state_dict for the given sizes, from DINOv2's source."""
    keys = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + grid * grid, d), "mask_token": (1, d),
            "patch_embed.proj.weight": (d, 3, 14, 14), "patch_embed.proj.bias": (d,),
            "norm.weight": (d,), "norm.bias": (d,)}
    if registers:
        keys["register_tokens"] = (1, registers, d)
    hidden = ffn_hidden or 4 * d
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "norm1.weight": (d,), b + "norm1.bias": (d,), b + "attn.qkv.weight": (3 * d, d),
                     b + "attn.qkv.bias": (3 * d,), b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
                     b + "ls1.gamma": (d,), b + "norm2.weight": (d,), b + "norm2.bias": (d,),
                     b + "ls2.gamma": (d,)})
        if swiglu:
            keys.update({b + "mlp.w12.weight": (2 * hidden, d), b + "mlp.w12.bias": (2 * hidden,),
                         b + "mlp.w3.weight": (d, hidden), b + "mlp.w3.bias": (d,)})
        else:
            keys.update({b + "mlp.fc1.weight": (hidden, d), b + "mlp.fc1.bias": (hidden,),
                         b + "mlp.fc2.weight": (d, hidden), b + "mlp.fc2.bias": (d,)})
    return keys


@pytest.mark.parametrize("arch,d,depth,regs,total,params_m", [
    ("vitb14", 768, 12, 0, 175, 86.6), ("vitb14_reg", 768, 12, 4, 176, 86.6), ("vits14", 384, 12, 0, 175, 22.1),
    ("vitl14", 1024, 24, 0, 343, 304.4)])
def test_state_dict_table(arch, d, depth, regs, total, params_m):
    shapes = state_dict_shapes(arch)
    assert shapes == expected_keys(d, depth, registers=regs)
    assert len(shapes) == total
    assert shapes["pos_embed"] == (1, 1370, d) and shapes["blocks.11.mlp.fc1.weight"] == (4 * d, d)
    assert abs(sum(math.prod(s) for s in shapes.values()) / 1e6 - params_m) < 0.1  # published sizes: 21M/86M/300M


def test_state_dict_table_vitg():
    shapes = state_dict_shapes("vitg14")
    assert shapes == expected_keys(1536, 40, ffn_hidden=4096, swiglu=True)  # (int(6144 * 2/3) + 7) // 8 * 8
    assert len(shapes) == 567


def _tiny_state(cfg_kw, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in expected_keys(cfg_kw["embed_dim"], cfg_kw["depth"],
                                                                            **kw).items()}


def test_strict_load_round_trip(tmp_path):
    state = _tiny_state(TINY)
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    model = DinoV2.from_checkpoint(str(path), "vitb14", **TINY)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for k in state:
        assert torch.equal(loaded[k], state[k]), k
    # wrapped / prefixed / chunked checkpoints load too
    wrapped = {"teacher": {f"backbone.blocks.0.{k[len('blocks.'):]}" if k.startswith("blocks.") else
                           f"backbone.{k}": v for k, v in state.items()}}
    torch.save(wrapped, tmp_path / "wrapped.pth")
    again = DinoV2.from_checkpoint(str(tmp_path / "wrapped.pth"), "vitb14", **TINY)
    assert all(torch.equal(again.state_dict()[k], state[k]) for k in state)


def test_patch_features_shape_and_reference(tmp_path):
    """Shapes, and the forward against a plain re-derivation of DINOv2's block (pre-norm, LayerScale, eps 1e-6,
    exact GELU, registers after the class token without positions, patches after the registers)."""
    kw = dict(TINY, num_register_tokens=2, img_size=224)  # 16x16 stored grid: no resampling
    model = DinoV2("vitb14_reg", **kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model.forward_patch_features(x)
        feats = model.forward_features(x)
    assert out.shape == (2, 256, 32) and feats["x_norm_clstoken"].shape == (2, 32)
    assert feats["x_norm_regtokens"].shape == (2, 2, 32)

    sd = {k: v.double() for k, v in model.state_dict().items()}
    d, h = 32, 4
    tok = F.conv2d(x.double(), sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=14)
    tok = tok.flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(2, 1, d), tok], 1) + sd["pos_embed"]
    t = torch.cat([t[:, :1], sd["register_tokens"].expand(2, 2, d), t[:, 1:]], 1)
    for i in range(2):
        b = f"blocks.{i}."
        y = F.layer_norm(t, (d,), sd[b + "norm1.weight"], sd[b + "norm1.bias"], 1e-6)
        q, k, v = (y @ sd[b + "attn.qkv.weight"].T + sd[b + "attn.qkv.bias"]).split(d, -1)
        q, k, v = (z.reshape(2, -1, h, d // h).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h), -1) @ v
        a = a.transpose(1, 2).reshape(2, -1, d) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
        t = t + a * sd[b + "ls1.gamma"]
        y = F.layer_norm(t, (d,), sd[b + "norm2.weight"], sd[b + "norm2.bias"], 1e-6)
        y = F.gelu(y @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
        t = t + (y @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]) * sd[b + "ls2.gamma"]
    ref = F.layer_norm(t, (d,), sd["norm.weight"], sd["norm.bias"], 1e-6)[:, 3:]
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


def test_patch_tokens_raster_order():
    model = DinoV2("vitb14", **dict(TINY, depth=0)).eval()  # features = norm(patch embedding + position)
    x = torch.randn(1, 3, 224, 224)
    y = x.clone()
    y[..., 0:14, 14:28] += 1.0  # patch (row 0, col 1)
    with torch.no_grad():
        diff = (model(x) - model(y)).abs().amax(-1)[0]
    assert diff[1] > 0 and torch.count_nonzero(diff) == 1


def test_pos_embed_interpolation():
    same = DinoV2("vitb14", **dict(TINY, img_size=224))
    assert same.interpolate_pos_encoding(16, 16) is same.pos_embed  # trained grid: the table itself

    model = DinoV2("vitb14", **TINY)  # hub table: 37x37
    pos = model.pos_embed.detach()
    out = model.interpolate_pos_encoding(16, 16)
    assert out.shape == (1, 257, 32) and torch.equal(out[:, 0], pos[:, 0])
    table = pos[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    # DINOv2 passes scale_factor (16 + 0.1) / 37, not size=16: the sampling positions differ from a size-based resize
    want = F.interpolate(table, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic")
    torch.testing.assert_close(out[:, 1:], want.permute(0, 2, 3, 1).reshape(1, 256, 32))
    by_size = F.interpolate(table, size=(16, 16), mode="bicubic").permute(0, 2, 3, 1).reshape(1, 256, 32)
    assert (out[:, 1:] - by_size).abs().max() > 1e-4
    # non-square grids (224 x 336) and a constant field stays constant
    assert model.interpolate_pos_encoding(16, 24).shape == (1, 1 + 16 * 24, 32)
    with torch.no_grad():
        model.pos_embed.fill_(0.5)
    torch.testing.assert_close(model.interpolate_pos_encoding(16, 16), torch.full((1, 257, 32), 0.5))
    # registers models: offset-free, anti-aliased, by size
    reg = DinoV2("vitb14_reg", **TINY)
    t = reg.pos_embed.detach()[:, 1:].reshape(1, 37, 37, 32).permute(0, 3, 1, 2)
    want = F.interpolate(t, size=(16, 16), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 256, 32)
    torch.testing.assert_close(reg.interpolate_pos_encoding(16, 16)[:, 1:], want)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        DinoV2.from_checkpoint(str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        DinoV2.from_checkpoint(str(bad))
    state = _tiny_state(TINY)
    del state["blocks.1.ls2.gamma"]
    state["blocks.1.extra"] = torch.zeros(3)
    state["blocks.0.attn.qkv.weight"] = torch.zeros(5, 32)
    torch.save(state, tmp_path / "mismatch.pth")
    with pytest.raises(ValueError, match=r"(?s)missing keys: blocks\.1\.ls2\.gamma.*unexpected keys: blocks\.1\.extra"
                                         r".*blocks\.0\.attn\.qkv\.weight: file \(5, 32\)"):
        DinoV2.from_checkpoint(str(tmp_path / "mismatch.pth"), "vitb14", **TINY)
    torch.save(_tiny_state(TINY), tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match="does not match arch 'vitl14'"):
        DinoV2.from_checkpoint(str(tmp_path / "tiny.pth"), "vitl14")
    with pytest.raises(ValueError, match="unknown arch"):
        dinov2_config("vitx14")
    model = DinoV2("vitb14", **TINY)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 100, 100))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 28, 28))


def test_imagenet_preprocess():
    u8 = torch.full((2, 3, 256, 256), 255, dtype=torch.uint8)
    out = imagenet_preprocess(u8)
    assert out.shape == (2, 3, 224, 224)
    torch.testing.assert_close(out[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]))
    torch.testing.assert_close(imagenet_preprocess(torch.ones(3, 224, 224)), imagenet_preprocess(u8[0]))  # [-1,1]
    with pytest.raises(ValueError, match="value_range"):
        imagenet_preprocess(torch.zeros(1, 3, 8, 8), value_range="0,255")


# ------------------------------------------------------------------------------------------------ crops / CLI
def _coord_image(h, w):
    """uint8 image whose channels encode (row, col) so crop positions can be read back."""
    r = torch.arange(h).view(h, 1).expand(h, w)
    c = torch.arange(w).view(1, w).expand(h, w)
    return torch.stack([r, c, torch.zeros_like(r)]).to(torch.uint8)


def test_ten_crop_order():
    x = _coord_image(31, 31)
    crops = ef.ten_crop(x, 28)
    origins = [(int(c[0, 0, 0]), int(c[1, 0, 0])) for c in crops[:5]]
    assert origins == [(0, 0), (0, 3), (3, 0), (3, 3), (2, 2)]  # centre: round(1.5) = 2 (half to even)
    for a, b in zip(crops[:4], [crops[6], crops[5], crops[8], crops[7]]):
        assert torch.equal(a.flip(-1), b)  # flipped image: left/right corners swap
    # the flipped image's centre crop is cut at the same offsets, so with an odd margin it is *not* the mirror
    # of crop 4 (LlamaGen's 281 -> 256 has margin 25): it starts one column further left in the original
    assert torch.equal(crops[9], x.flip(-1)[:, 2:30, 2:30]) and not torch.equal(crops[9], crops[4].flip(-1))
    assert len(ef.five_crop(_coord_image(281, 281), 256)) == 5
    assert int(ef.five_crop(_coord_image(281, 281), 256)[4][0, 0, 0]) == 12  # round(12.5) = 12, torchvision


def test_center_crop_and_llamagen_crops():
    x = _coord_image(40, 60)
    sq = ef.center_crop_arr(x, 40)  # short side already 40: no resize, offsets (0, 10)
    assert torch.equal(sq, x[:, :, 10:50])
    big = torch.randint(0, 256, (3, 90, 130), dtype=torch.uint8)
    out = ef.center_crop_arr(big, 40)  # 90 >= 80: box-halved to 45x65, bicubic to 40x58, centre cut
    assert out.shape == (3, 40, 40) and out.dtype == torch.uint8
    ten = ef.llamagen_crops(big, image_size=32, num_crops=10)
    assert ten.shape == (10, 3, 32, 32) and ten.min() >= -1 and ten.max() <= 1
    sq35 = ef.center_crop_arr(big, int(32 * 1.1))
    torch.testing.assert_close(ten[3], sq35[:, 3:, 3:].float() / 127.5 - 1)  # bottom-right of the 35 px square
    flip = ef.llamagen_crops(big, image_size=32, num_crops=2)
    assert flip.shape == (2, 3, 32, 32) and torch.equal(flip[1], flip[0].flip(-1))
    with pytest.raises(ValueError, match="num_crops"):
        ef.llamagen_crops(big, image_size=32, num_crops=5)


def test_extract_cli_end_to_end(tmp_path):
    """Images (uint8 .npy, ImageFolder layout) + LlamaGen code/label files -> feature files that LlamaGenCodes
    serves next to the codes, one (H*W, Z) block per crop, equal to the encoder on that crop."""
    from models.data.codes import LlamaGenCodes, code_dirs, write_item

    images_dir = tmp_path / "images"
    rng = np.random.default_rng(0)
    files = [("a", "0.npy"), ("a", "1.npy"), ("b", "x.npy")]
    for cls, name in files:
        os.makedirs(images_dir / cls, exist_ok=True)
        np.save(images_dir / cls / name, rng.integers(0, 256, (40, 52, 3), dtype=np.uint8))
    codes_dir, labels_dir = code_dirs(str(tmp_path / "codes"), image_size=32)
    for i, label in enumerate([0, 0, 1]):
        write_item(i, codes_dir, labels_dir, np.zeros((10, 4), dtype=np.int64), label)  # 32 px / 16 -> 2x2 codes
    torch.save(_tiny_state(TINY), tmp_path / "enc.pth")
    out = tmp_path / "feats"
    arch = "vitb14:" + ",".join(f"{k}={v}" for k, v in TINY.items())  # the CLI spelling of a reduced config
    assert ef.main(["--encoder", str(tmp_path / "enc.pth"), "--arch", arch, "--images-dir", str(images_dir),
                    "--codes-dir", codes_dir, "--out", str(out), "--image-size", "32", "--device", "cpu",
                    "--images-per-step", "2", "--batch-size", "4"]) == 0  # batches cross image boundaries
    feats = np.load(out / "2.npy")
    assert feats.shape == (10, 4, 32) and feats.dtype == np.float16
    encoder = DinoV2.from_checkpoint(str(tmp_path / "enc.pth"), "vitb14", **TINY)
    image = ef.load_image(str(images_dir / "b" / "x.npy"))
    ours = ef.crop_features(encoder, image, image_size=32, num_crops=10, encoder_size=28, resize="antialias")
    ef.prepare_encoder(encoder, 2, "mirai")  # the CLI's default --prep mirai: the table resampled once to 2x2
    want = ef.crop_features(encoder, image, image_size=32, num_crops=10, encoder_size=28)
    assert (want - ours).abs().max() > 1e-2  # the preparations differ measurably
    np.testing.assert_allclose(feats.astype(np.float32), want.numpy(), atol=2e-3, rtol=2e-3)
    ds = LlamaGenCodes(codes_dir, labels_dir, crop=7, features_dir=str(out), vocab_size=16)
    _, label, f = ds[2]
    assert label == 1 and torch.equal(f, torch.from_numpy(feats[7]))

    # images in the wrong order for the labels -> clear error
    write_item(1, codes_dir, labels_dir, np.zeros((10, 4), dtype=np.int64), 1)
    paths, labels = ef.list_images(str(images_dir))
    assert ef.extract(encoder, paths, str(out), image_size=32, encoder_size=28, progress=False) == 0  # resumable
    assert labels == [0, 0, 1]
    with pytest.raises(ValueError, match="not in the order"):
        ef.extract(encoder, paths, str(tmp_path / "f2"), labels=labels, labels_dir=labels_dir, image_size=32,
                   encoder_size=28, progress=False)


def test_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="images directory"):
        ef.list_images(str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        ef.list_images(str(tmp_path / "empty"))
    np.save(tmp_path / "gray.npy", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"uint8 \(H, W, 3\)"):
        ef.load_image(str(tmp_path / "gray.npy"))
    (tmp_path / "img.png").write_bytes(b"\x89PNG")
    try:
        import PIL  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs Pillow"):
            ef.load_image(str(tmp_path / "img.png"))
    else:
        with pytest.raises(ValueError, match="unreadable image"):
            ef.load_image(str(tmp_path / "img.png"))


class _FakePIL:
    """Stands in for Pillow (absent on the CI machine) to pin the PIL branch's geometry: which resizes it asks for
    (box halving while the short side >= 2x, then bicubic to a rounded size) and where it cuts."""
    BOX, BICUBIC = "box", "bicubic"
    calls = []

    class Img:
        def __init__(self, arr):
            self.arr = arr

        @property
        def size(self):
            return (self.arr.shape[1], self.arr.shape[0])  # PIL: (width, height)

        def resize(self, size, resample):
            _FakePIL.calls.append((size, resample))
            rows = np.arange(size[1]) * self.arr.shape[0] // size[1]
            cols = np.arange(size[0]) * self.arr.shape[1] // size[0]
            return _FakePIL.Img(self.arr[rows][:, cols])

        def __array__(self, dtype=None, copy=None):
            return self.arr if dtype is None else self.arr.astype(dtype)


def test_center_crop_pil_branch(monkeypatch):
    monkeypatch.setattr(ef, "_pil", lambda: _FakePIL)
    _FakePIL.calls.clear()
    arr = np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8)
    out = ef.center_crop_arr(_FakePIL.Img(arr), 70)  # 300 -> 150 (>= 140) -> 75: box twice, then bicubic
    assert _FakePIL.calls == [((225, 150), "box"), ((112, 75), "box"), ((105, 70), "bicubic")]  # 112*70/75=104.53
    assert out.shape == (3, 70, 70) and out.dtype == torch.uint8
    final = _FakePIL.Img(arr).resize((225, 150), "box").resize((112, 75), "box").resize((105, 70), "bicubic").arr
    assert torch.equal(out, torch.from_numpy(final[:, 17:87]).permute(2, 0, 1))  # left (105 - 70) // 2 = 17
    assert out.shape == ef.center_crop_arr(torch.from_numpy(arr).permute(2, 0, 1).contiguous(), 70).shape
