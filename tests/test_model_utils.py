"""Tests for model_utils.py: backbone loading (random, timm/Meta checkpoints, hub cache, offline),
preprocessing (the 518-px trap, PIL modes, augmentation) and the token split.

Everything runs on CPU without a network. Expectations come from timm itself (forward_features,
forward_head, resolve_model_data_config, resample_abs_pos_embed), from hand computations, or from
the seeded source model a checkpoint was written from.
"""
import os
import random
import socket

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_model_data_config
from timm.layers import resample_abs_pos_embed

from conftest import TINY_KWARGS, TINY_MODEL
from model_utils import (WeightsUnavailableError, extract_tokens, grid_size, load_backbone, load_weights_file,
                         make_transform, model_input_size)

HUB_REPO_DIR = "models--timm--vit_base_patch14_reg4_dinov2.lvd142m"  # huggingface_hub's cache layout
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


# ------------------------------------------------------------------------------------------- helpers

def randomise_(model, seed):
    """Overwrite every parameter with seeded noise. timm's init makes CLS/registers ~1e-6 and layer
    scale 1e-5, so CLS and registers would be near-identical and the blocks near-inert: an order or
    loading mistake could then go unseen."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def tiny(seed, **overrides):
    """A frozen tiny model of the real family (4x4 grid, 5 prefix tokens) with seeded random weights."""
    return randomise_(load_backbone(TINY_MODEL, pretrained=False, **{**TINY_KWARGS, **overrides}), seed)


def tiny_timm(seed, **overrides):
    """Same, built by timm directly (load_backbone takes a square int img_size only)."""
    model = timm.create_model(TINY_MODEL, pretrained=False, **{**TINY_KWARGS, **overrides})
    return randomise_(model.eval().requires_grad_(False), seed)


def images_for(model, batch=2, seed=0):
    h, w = model_input_size(model)
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_frozen(model):
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())


def to_meta_format(timm_state, seed):
    """Convert a timm DINOv2-reg state dict back to Meta's release layout: the CLS token carries a
    position embedding of its own (pos_embed has a CLS slot), registers are "register_tokens", and
    there is a mask token. timm folds that CLS slot into cls_token when it converts the file."""
    state = dict(timm_state)
    cls_timm, reg, pos_timm = state.pop("cls_token"), state.pop("reg_token"), state.pop("pos_embed")
    dim = cls_timm.shape[-1]
    pos_cls = torch.randn(1, 1, dim, generator=torch.Generator().manual_seed(seed))
    meta = {
        "cls_token": cls_timm - pos_cls,                       # 1, 1, D
        "register_tokens": reg,                                # 1, 4, D
        "mask_token": torch.zeros(1, dim),                     # 1, D
        "pos_embed": torch.cat([pos_cls, pos_timm], dim=1),    # 1, 1 + N, D
    }
    meta.update(state)  # patch_embed.*, blocks.* (ls1.gamma, mlp.fc1 ...), norm.*: same names in both
    return meta


@pytest.fixture
def create_model_spy(monkeypatch):
    """Wrap timm.create_model; record the `pretrained` flag of every call. A pretrained=True call is
    refused here (it would go to the network), so a regression fails loudly instead of hanging."""
    calls = []
    real = timm.create_model

    def spy(*args, **kwargs):
        pretrained = bool(args[1] if len(args) > 1 else kwargs.get("pretrained", False))
        calls.append(pretrained)
        if pretrained:
            raise AssertionError("timm.create_model(pretrained=True) was called: that would use the network")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    return calls


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Point the hub cache and torch.hub at empty folders: no weights cached anywhere."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path


def clear_proxies(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def silent_listener():
    """A local TCP port that accepts connections (kernel backlog) and never answers: a fake proxy."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


# ------------------------------------------------------------------------------ real architecture, 224

def test_real_architecture_at_224_with_the_518_trap():
    model = load_backbone("vit_base_patch14_reg4_dinov2.lvd142m", pretrained=False)  # img_size 224
    assert_frozen(model)
    assert model.num_prefix_tokens == 5
    assert model_input_size(model) == (224, 224) and grid_size(model) == (16, 16)
    # The trap is real: timm's data config for this model says 518 px although it is built at 224 ...
    assert resolve_model_data_config(model)["input_size"] == (3, 518, 518)
    # ... but make_transform produces what the model was built for.
    transform = make_transform(model)
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    grey = Image.new("L", (300, 500), 90)
    batch = torch.stack([transform(rgb), transform(grey)])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == torch.float32
    with torch.inference_mode():  # the one forward of the real architecture in this file
        cue, patches = extract_tokens(model, batch)
    assert cue.shape == (2, 5, 768)
    assert patches.shape == (2, 16, 16, 768)


# -------------------------------------------------------------------------------------- token order

def test_tokens_are_slices_of_forward_features_in_order():
    model = tiny(seed=1)
    assert_frozen(model)
    x = images_for(model)
    with torch.no_grad():
        out = model.forward_features(x)                                   # B, 5 + 16, D
        cue, patches = extract_tokens(model, x)
    P, (gh, gw) = model.num_prefix_tokens, grid_size(model)
    assert (P, gh, gw) == (5, 4, 4)
    assert cue.shape == (2, 5, 64) and patches.shape == (2, 4, 4, 64)
    assert torch.equal(cue, out[:, :P])
    assert torch.equal(patches[:, 1, 2], out[:, P + 1 * gw + 2])          # row 1, col 2 -> token 11
    for row in range(gh):
        for col in range(gw):
            assert torch.equal(patches[:, row, col], out[:, P + row * gw + col])
    # cue[:, 0] is the CLS token: what timm's own 'token' pooling picks (the model has no classifier).
    assert model.global_pool == "token" and model.num_classes == 0
    with torch.no_grad():
        assert torch.equal(cue[:, 0], model.forward_head(out, pre_logits=True))
        assert torch.equal(cue[:, 0], model(x))
    assert not torch.equal(cue[:, 0], cue[:, 1])                          # CLS and registers differ


def test_non_square_model_gives_a_4x6_grid_in_row_major_order():
    model = tiny_timm(seed=2, img_size=(56, 84))
    x = images_for(model)                                                 # 2, 3, 56, 84
    with torch.no_grad():
        out = model.forward_features(x)
        cue, patches = extract_tokens(model, x)
    assert grid_size(model) == (4, 6)
    assert cue.shape == (2, 5, 64) and patches.shape == (2, 4, 6, 64)
    assert torch.equal(cue, out[:, :5])
    assert torch.equal(patches[:, 2, 5], out[:, 5 + 2 * 6 + 5])           # row 2, col 5 -> token 22
    for row in range(4):
        for col in range(6):
            assert torch.equal(patches[:, row, col], out[:, 5 + row * 6 + col])
    with pytest.raises(ValueError, match="make_transform"):
        extract_tokens(model, x.transpose(-1, -2))                        # 84 x 56: transposed


def test_patch_grid_position_is_the_image_position():
    """Independent of timm's flattening: with no blocks and no position embedding each patch token
    only sees its own pixels, so lighting one 14x14 patch changes exactly that grid cell."""
    model = tiny_timm(seed=3, img_size=(56, 84), depth=0)
    with torch.no_grad():
        model.pos_embed.zero_()
        x = torch.zeros(1, 3, 56, 84)
        x[:, :, 14:28, 56:70] = 1.0                                       # patch row 1, col 4
        cue, patches = extract_tokens(model, x)
        changed = ((patches[0] - patches[0, 0, 0]).abs().sum(-1) > 1e-4).nonzero().tolist()
        assert changed == [[1, 4]]
        # Prefix order: [CLS, reg0..reg3], each normed by the final norm.
        assert torch.allclose(cue[0, 0], model.norm(model.cls_token)[0, 0], atol=1e-6)
        assert torch.allclose(cue[0, 1:], model.norm(model.reg_token)[0], atol=1e-6)


# ------------------------------------------------------------------------------------ preprocessing

def test_transform_normalises_with_timms_config():
    model = tiny(seed=0)
    config = resolve_model_data_config(model)
    mean, std = config["mean"], config["std"]
    transform = make_transform(model)
    # Constant image: resizing keeps it constant, so each channel is (v / 255 - mean) / std.
    value = (10, 128, 250)
    out = transform(Image.new("RGB", (90, 70), value))
    assert out.shape == (3, 56, 56) and out.dtype == torch.float32
    for c in range(3):
        expected = (value[c] / 255 - mean[c]) / std[c]
        assert torch.allclose(out[c], torch.full((56, 56), expected), atol=1e-6)
    # Textured image: the same as resizing the short side with the config's interpolation, then a
    # centre crop, by hand with PIL (90x70 -> 72x56, crop 8 px from the left).
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == 1.0
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8))

    def by_hand(resample):
        resized = np.asarray(image.resize((72, 56), resample), dtype=np.float32) / 255  # 56, 72, 3
        cropped = torch.from_numpy(resized[:, 8:64]).permute(2, 0, 1)                   # 3, 56, 56
        return (cropped - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]

    out = transform(image)
    assert torch.allclose(out, by_hand(Image.BICUBIC), atol=1e-5)
    assert not torch.allclose(out, by_hand(Image.BILINEAR), atol=1e-3)  # the check can tell them apart


def _png_roundtrip(image, tmp_path, **save_kwargs):
    path = tmp_path / "image.png"
    image.save(path, **save_kwargs)
    return Image.open(path)


@pytest.mark.parametrize("mode", ["RGB", "L", "1", "RGBA", "RGBa", "LA", "La", "P", "P+transparency", "PA",
                                  "CMYK", "YCbCr", "I", "F", "I;16", "I;16B"])
def test_transform_accepts_any_pil_mode(mode, tmp_path):
    transform = make_transform(tiny(seed=0))
    rng = np.random.default_rng(0)
    if mode == "P+transparency":
        image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).quantize(16)
        image = _png_roundtrip(image, tmp_path, transparency=0)
        assert image.mode == "P" and "transparency" in image.info
    elif mode == "I;16B":
        image = Image.frombytes(mode, (50, 40), rng.integers(0, 65536, (40, 50)).astype(">u2").tobytes())
    else:
        image = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).convert(mode)
    assert image.mode == mode.split("+")[0]
    out = transform(image)
    assert out.shape == (3, 56, 56) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_transparent_pixels_composite_onto_white(tmp_path):
    transform = make_transform(tiny(seed=0))
    white = transform(Image.new("RGB", (40, 40), (255, 255, 255)))
    assert torch.equal(transform(Image.new("RGBA", (40, 40), (10, 200, 30, 0))), white)
    assert torch.equal(transform(Image.new("LA", (40, 40), (0, 0))), white)
    palette = Image.new("P", (40, 40), 0)
    palette.putpalette([200, 0, 0] + [0, 0, 0] * 255)
    palette = _png_roundtrip(palette, tmp_path, transparency=0)
    assert torch.equal(transform(palette), white)
    # Opaque pixels keep their colour; alpha does not leak into it.
    colour = transform(Image.new("RGB", (40, 40), (10, 200, 30)))
    assert not torch.equal(colour, white)
    assert torch.equal(transform(Image.new("RGBA", (40, 40), (10, 200, 30, 255))), colour)


def test_16_bit_greyscale_is_scaled_not_clipped():
    """A 16-bit PNG opens as I;16 (0..65535). Pillow's convert("RGB") clips at 255, which would make
    nearly every such image white; the transform scales by 1/257 instead."""
    transform = make_transform(tiny(seed=0))
    values = np.random.default_rng(2).integers(0, 65536, (60, 60)).astype(np.uint16)
    image16 = Image.fromarray(values)
    assert image16.mode == "I;16"
    as_8_bit = Image.fromarray(np.floor(values / 257 + 0.5).astype(np.uint8), mode="L")
    assert torch.equal(transform(image16), transform(as_8_bit))


@pytest.mark.parametrize("img_size", [56, (56, 84)])
def test_augmented_transform_size_and_randomness(img_size):
    model = tiny_timm(seed=0, img_size=img_size)
    augment = make_transform(model, augment=True)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (100, 120, 3), dtype=np.uint8))

    def seeded(seed):
        random.seed(seed)       # timm's random resized crop draws from `random`
        torch.manual_seed(seed)  # flip and colour jitter from torch
        return augment(image)

    first = seeded(1)
    assert first.shape == (3, *model_input_size(model)) and first.dtype == torch.float32
    assert torch.equal(seeded(1), first)
    assert not torch.equal(seeded(2), first)
    plain = make_transform(model)
    assert torch.equal(plain(image), plain(image))


# ------------------------------------------------------------------------------- checkpoint loading

@pytest.mark.parametrize("layout", ["safetensors", "pth", "wrapped_ddp"])
def test_timm_format_checkpoint_reloads_exactly(layout, tmp_path):
    source = tiny(seed=5)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if layout == "safetensors":
        from safetensors.torch import save_file
        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
    elif layout == "pth":
        path = tmp_path / "weights.pth"
        torch.save(state, path)
    else:
        path = tmp_path / "weights.bin"
        torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, path)
    loaded = load_backbone(TINY_MODEL, checkpoint_path=path, **TINY_KWARGS)
    assert_frozen(loaded)
    assert_same_weights(loaded, source)
    x = images_for(source)
    with torch.no_grad():
        for mine, theirs in zip(extract_tokens(loaded, x), extract_tokens(source, x)):
            assert torch.equal(mine, theirs)
    # load_weights_file on its own does the same.
    assert_same_weights(load_weights_file(tiny(seed=6), path), source)


def test_meta_format_checkpoint_loads_to_the_same_model(tmp_path):
    source = tiny(seed=7)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(to_meta_format(source.state_dict(), seed=8), path)
    loaded = load_backbone(TINY_MODEL, checkpoint_path=path, **TINY_KWARGS)
    assert_frozen(loaded)
    assert torch.allclose(loaded.cls_token, source.cls_token, atol=1e-6)  # CLS slot folded back in
    assert torch.equal(loaded.reg_token, source.reg_token)
    assert torch.equal(loaded.pos_embed, source.pos_embed)
    x = images_for(source)
    with torch.no_grad():
        for mine, theirs in zip(extract_tokens(loaded, x), extract_tokens(source, x)):
            assert torch.allclose(mine, theirs, atol=1e-5)


def test_meta_format_checkpoint_position_embeddings_are_resampled(tmp_path):
    source = tiny(seed=9, img_size=84)                                    # written at a 6x6 grid
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(to_meta_format(source.state_dict(), seed=10), path)
    loaded = load_backbone(TINY_MODEL, checkpoint_path=path, **{**TINY_KWARGS, "img_size": 56})  # 4x4
    assert grid_size(loaded) == (4, 4)
    expected = resample_abs_pos_embed(source.pos_embed, new_size=(4, 4), num_prefix_tokens=0)
    assert loaded.pos_embed.shape == (1, 16, 64)
    assert torch.allclose(loaded.pos_embed, expected, atol=1e-6)
    assert torch.allclose(loaded.cls_token, source.cls_token, atol=1e-6)
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    cue, patches = extract_tokens(loaded, images_for(loaded))
    assert cue.shape == (2, 5, 64) and patches.shape == (2, 4, 4, 64)


class _Payload:
    """Unpickling this calls os.mkdir(marker): a stand-in for code hidden in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_pickled_code_in_a_checkpoint_is_refused_not_run(tmp_path):
    marker = str(tmp_path / "payload_ran")
    path = tmp_path / "weights.pth"
    torch.save({"pos_embed": torch.zeros(1), "extra": _Payload(marker)}, path)
    # Control: an unsafe load would run it.
    torch.load(path, weights_only=False)
    assert os.path.isdir(marker)
    os.rmdir(marker)
    with pytest.raises(ValueError, match="checkpoint_path") as info:
        load_backbone(TINY_MODEL, checkpoint_path=path, **TINY_KWARGS)
    assert "weights_only" in str(info.value)
    assert not os.path.exists(marker)


def test_mismatched_or_missing_checkpoint(tmp_path):
    narrow = tmp_path / "narrow.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tiny(seed=0, embed_dim=32).state_dict().items()}, str(narrow))
    with pytest.raises(ValueError, match="checkpoint_path") as info:
        load_backbone(TINY_MODEL, checkpoint_path=narrow, **TINY_KWARGS)  # width 32 into width 64
    assert str(narrow) in str(info.value)
    foreign = tmp_path / "foreign.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, foreign)
    with pytest.raises(ValueError, match="checkpoint_path"):
        load_backbone(TINY_MODEL, checkpoint_path=foreign, **TINY_KWARGS)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_dict)
    with pytest.raises(ValueError, match="state dict"):
        load_backbone(TINY_MODEL, checkpoint_path=not_a_dict, **TINY_KWARGS)
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(FileNotFoundError, match="checkpoint_path") as info:
        load_backbone(TINY_MODEL, checkpoint_path=missing, **TINY_KWARGS)
    assert str(missing) in str(info.value)


# ------------------------------------------------------------------------------ hub cache / offline

def _assert_directions(error):
    message = str(error)
    for needed in (TINY_MODEL, "not in the local cache", "checkpoint_path=", "pretrained=False"):
        assert needed in message, (needed, message)


def test_offline_flag_without_cached_weights_fails_with_directions(empty_caches, create_model_spy):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone(TINY_MODEL, pretrained=True, **TINY_KWARGS)
    _assert_directions(info.value)
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert True not in create_model_spy


def test_unreachable_hub_fails_with_directions(empty_caches, create_model_spy, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    clear_proxies(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone(TINY_MODEL, pretrained=True, **TINY_KWARGS)
    _assert_directions(info.value)
    assert "127.0.0.1:9" in str(info.value)
    assert True not in create_model_spy


def test_reachability_probe_goes_through_the_schemes_proxy(empty_caches, create_model_spy, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    clear_proxies(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # never resolved: the proxy is asked instead
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    with pytest.raises(WeightsUnavailableError, match="127.0.0.1:9") as info:
        load_backbone(TINY_MODEL, pretrained=True, **TINY_KWARGS)
    _assert_directions(info.value)
    assert True not in create_model_spy


@pytest.mark.parametrize("proxy_env", [{"HTTPS_PROXY": None},                      # wrong scheme
                                       {"HTTP_PROXY": None, "NO_PROXY": "127.0.0.1"}])  # host exempt
def test_reachability_probe_skips_proxies_that_do_not_apply(proxy_env, empty_caches, create_model_spy,
                                                            silent_listener, monkeypatch):
    """A proxy that would accept the connection but does not apply to the endpoint must not make the
    hub look reachable (then timm would start its slow download retries)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    clear_proxies(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for name, value in proxy_env.items():
        monkeypatch.setenv(name, value if value is not None else silent_listener)
    with pytest.raises(WeightsUnavailableError, match="127.0.0.1:9") as info:
        load_backbone(TINY_MODEL, pretrained=True, **TINY_KWARGS)
    _assert_directions(info.value)
    assert True not in create_model_spy


@pytest.mark.parametrize("network", ["offline_flag", "unreachable"])
def test_cached_hub_weights_load_without_network(network, empty_caches, create_model_spy, monkeypatch):
    source = tiny(seed=11)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = empty_caches / "hf_hub" / HUB_REPO_DIR
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "model.safetensors"))
    if network == "unreachable":
        monkeypatch.delenv("HF_HUB_OFFLINE")
        clear_proxies(monkeypatch)
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    loaded = load_backbone(TINY_MODEL, pretrained=True, **TINY_KWARGS)
    assert_frozen(loaded)
    assert_same_weights(loaded, source)
    assert create_model_spy and True not in create_model_spy


# ------------------------------------------------------------------------------------- bad inputs

def test_extract_tokens_rejects_bad_images(tiny_model):
    good = torch.zeros(1, 3, 56, 56)
    extract_tokens(tiny_model, good)
    with pytest.raises(ValueError, match=r"images: expected shape \(B, 3, H, W\), got \(3, 56, 56\)"):
        extract_tokens(tiny_model, good[0])
    with pytest.raises(ValueError, match=r"images: .*got \(1, 1, 56, 56\)"):
        extract_tokens(tiny_model, torch.zeros(1, 1, 56, 56))
    with pytest.raises(ValueError, match=r"images: expected spatial size \(56, 56\).*\(70, 70\).*make_transform"):
        extract_tokens(tiny_model, torch.zeros(1, 3, 70, 70))
    with pytest.raises(TypeError, match="images: expected a torch.Tensor, got ndarray"):
        extract_tokens(tiny_model, np.zeros((1, 3, 56, 56), dtype=np.float32))
    with pytest.raises(TypeError, match="model"):
        extract_tokens(torch.nn.Linear(3, 3), good)


def test_make_transform_rejects_bad_inputs(tiny_model):
    with pytest.raises(TypeError, match="image: expected a PIL.Image.Image, got Tensor"):
        make_transform(tiny_model)(torch.zeros(3, 56, 56))
    with pytest.raises(TypeError, match="model"):
        make_transform(torch.nn.Linear(3, 3))


@pytest.mark.parametrize("img_size", [0, -14, "224", 224.0, True])
def test_load_backbone_rejects_bad_img_size(img_size):
    with pytest.raises(ValueError, match="img_size: expected a positive int") as info:
        load_backbone(TINY_MODEL, pretrained=False, img_size=img_size)
    assert repr(img_size) in str(info.value)


@pytest.mark.parametrize("pretrained", [False, True])
def test_load_backbone_rejects_unknown_model_names(pretrained):
    with pytest.raises(ValueError, match="model_name: expected a timm model name.*'not_a_vit'"):
        load_backbone("not_a_vit", pretrained=pretrained)
    with pytest.raises(ValueError, match="model_name: .*no_such_tag"):
        load_backbone("vit_base_patch14_reg4_dinov2.no_such_tag", pretrained=pretrained)
    with pytest.raises(TypeError, match="model_name"):
        load_backbone(None, pretrained=pretrained)
