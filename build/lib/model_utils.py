"""The backbone: load a timm DINOv2-with-registers ViT, preprocess images for it, split its tokens.

- ``load_backbone``: a frozen timm model in eval mode, from timm's hub cache, from a local checkpoint
  (timm format, or Meta's official DINOv2 release file), or randomly initialised. Offline, it fails in
  seconds with an error that says what to do, instead of timm's ~48 s of download retries.
- ``make_transform``: PIL image (any mode) -> (3, H, W) float tensor at the size the model was *built*
  for. (timm's pretrained config for the DINOv2 models says 518 px even for a model built at 224; a
  transform built from it naively feeds 518 px images and gives a 37x37 patch grid.)
- ``extract_tokens``: images (B, 3, H, W) -> cue tokens (B, P, D) = [CLS] + registers, and the patch
  grid (B, Gh, Gw, D), both after the final norm. For ViT-B/14-reg4 at 224: P=5, 16x16, D=768.

Needs torch, timm and pillow (huggingface_hub and safetensors come with timm).
"""
import os
import pickle
import socket
import sys
import urllib.request
from typing import Any, Callable, Dict, Optional, Tuple, Union
from urllib.parse import urlparse

import timm
import torch
from PIL import Image
from torch import nn

__all__ = ["DEFAULT_MODEL", "WeightsUnavailableError", "load_backbone", "make_transform", "extract_tokens",
           "grid_size", "load_weights_file"]

DEFAULT_MODEL = "vit_base_patch14_reg4_dinov2.lvd142m"
DEFAULT_IMG_SIZE = 224
REACHABILITY_TIMEOUT_S = 3.0  # how long to wait for the hub's host before calling the weights unreachable
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for in a hub repo, in order


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable right now."""


# ----------------------------------------------------------------------------------------------- loading

def load_backbone(
        model_name: str = DEFAULT_MODEL,
        *,
        pretrained: bool = True,
        checkpoint_path: Optional[Union[str, os.PathLike]] = None,
        img_size: int = DEFAULT_IMG_SIZE,
        device: Optional[Union[str, torch.device]] = None,
        **timm_kwargs: Any,
) -> nn.Module:
    """Create a timm model, load its weights, freeze it and put it in eval mode.

    Args:
        model_name: a timm model name, e.g. "vit_base_patch14_reg4_dinov2.lvd142m".
        pretrained: load timm's pretrained weights (from the local hub cache, or downloaded by timm).
            Ignored when ``checkpoint_path`` is given.
        checkpoint_path: load weights from this local file instead: ``.safetensors``, or a ``.pth``/``.bin``
            read with ``torch.load(weights_only=True)``. timm-format files and Meta's official DINOv2
            files (e.g. ``dinov2_vitb14_reg4_pretrain.pth``) both work: timm's own checkpoint filter
            converts the key names and resamples the position embeddings to ``img_size``.
        img_size: input side the model is built for (position embeddings are resampled to it).
        device: where to put the model (default: CPU).
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``depth=2, embed_dim=64`` for a tiny model).

    Returns:
        The model, in eval mode, every parameter with ``requires_grad=False``.

    Raises:
        WeightsUnavailableError: ``pretrained=True`` but the weights are not cached and the hub cannot be
            reached (within ~3 s, no retries).
        FileNotFoundError: ``checkpoint_path`` does not exist.
    """
    if not isinstance(model_name, str) or not model_name:
        raise TypeError(f"model_name: expected a timm model name (str), got {model_name!r}")
    _check_model_name(model_name)
    if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
        raise ValueError(f"img_size: expected a positive int, got {img_size!r}")
    timm_kwargs.setdefault("img_size", img_size)

    if checkpoint_path is not None:
        checkpoint_path = os.fspath(checkpoint_path)
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint_path: no such file: {checkpoint_path}")
        model = timm.create_model(model_name, pretrained=False, **timm_kwargs)
        load_weights_file(model, checkpoint_path)
    elif pretrained:
        cached = _cached_weights_file(model_name)
        if cached is not None:
            # Read the cached file ourselves: no network round trip, and the same safe loader and
            # timm checkpoint filter as for a local checkpoint.
            model = timm.create_model(model_name, pretrained=False, **timm_kwargs)
            load_weights_file(model, cached)
        else:
            _require_hub_reachable(model_name)
            model = timm.create_model(model_name, pretrained=True, **timm_kwargs)
    else:
        model = timm.create_model(model_name, pretrained=False, **timm_kwargs)

    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def load_weights_file(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a local weights file into ``model`` without unpickling code, via timm's checkpoint filter.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``.
    Wrappers ({"state_dict": ...}, {"model": ...}) and DDP's "module." prefixes are removed. The filter
    of the model's timm module (``checkpoint_filter_fn``) then converts foreign key layouts (Meta's
    DINOv2 release) and resamples position embeddings to the model's grid. Loading is strict.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state_dict: Dict[str, Any] = load_file(path, device="cpu")
    else:
        try:
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"checkpoint_path: {path} holds pickled objects other than tensors; refusing to "
                             f"unpickle it (torch.load(weights_only=True)). Save a plain state dict.") from e
    if not isinstance(state_dict, dict):
        raise ValueError(f"checkpoint_path: expected a state dict in {path}, got {type(state_dict).__name__}")
    for key in ("state_dict", "model", "teacher"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    filter_fn: Optional[Callable] = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    try:
        if filter_fn is not None:
            state_dict = filter_fn(state_dict, model)
        model.load_state_dict(state_dict, strict=True)
    except (RuntimeError, KeyError) as e:
        raise ValueError(f"checkpoint_path: {path} does not fit {type(model).__name__}: {e}") from None
    return model


def _check_model_name(model_name: str) -> None:
    """ValueError for a name timm does not know (unknown architecture or pretrained tag)."""
    if ":" in model_name:
        return  # "hf-hub:..." / "local-dir:..." names are timm's to resolve
    from timm.models import get_pretrained_cfg
    try:
        get_pretrained_cfg(model_name)  # raises on an unknown tag, e.g. "vit_base_patch14_reg4_dinov2.bad"
    except RuntimeError as e:
        raise ValueError(f"model_name: expected a timm model name (see timm.list_models()), got {model_name!r}: "
                         f"{e}") from None
    if not timm.is_model(model_name):
        raise ValueError(f"model_name: expected a timm model name (see timm.list_models()), got {model_name!r}")


def _hub_cache_dir() -> Optional[str]:
    """The Hugging Face hub cache folder, read from the environment at call time (not import time)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # huggingface_hub's default


def _cached_weights_file(model_name: str) -> Optional[str]:
    """Path of the model's pretrained weights in the local hub or torch.hub cache, or None. No network."""
    cfg = _pretrained_cfg(model_name)
    hf_hub_id = cfg.get("hf_hub_id")
    if hf_hub_id:
        from huggingface_hub import try_to_load_from_cache
        repo_id, _, revision = hf_hub_id.partition("@")
        filenames = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else list(_HUB_FILES)
        for filename in filenames:
            path = try_to_load_from_cache(repo_id, filename, cache_dir=_hub_cache_dir(), revision=revision or None)
            if isinstance(path, str) and os.path.isfile(path):
                return path
    if cfg.get("url"):
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg["url"]).path))
        if os.path.isfile(path):
            return path
    return None


def _pretrained_cfg(model_name: str) -> Dict[str, Any]:
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(model_name)
    if cfg is None:
        if model_name not in timm.list_models():
            raise ValueError(f"model_name: expected a timm model name, got {model_name!r}")
        raise WeightsUnavailableError(
            f"{model_name}: timm has no pretrained weights for this name; use pretrained=False, or "
            f"checkpoint_path=PATH")
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _require_hub_reachable(model_name: str) -> None:
    """Fail fast, with directions, when the weights cannot be downloaded (offline flag or no route)."""
    cfg = _pretrained_cfg(model_name)
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co") if cfg.get("hf_hub_id") else cfg.get("url", "")
    why = None
    if cfg.get("hf_hub_id") and os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        why = "HF_HUB_OFFLINE is set"
    else:
        # Through a proxy if one is configured for this scheme (and NO_PROXY does not exempt the host):
        # then the proxy is what must answer.
        target = urlparse(url)
        proxy = urllib.request.getproxies().get(target.scheme)
        if proxy and not urllib.request.proxy_bypass(target.hostname or ""):
            target = urlparse(proxy)
        port = target.port or (443 if target.scheme == "https" else 80)
        try:
            socket.create_connection((target.hostname or "", port), timeout=REACHABILITY_TIMEOUT_S).close()
        except OSError as e:
            why = f"{target.hostname}:{port} is unreachable ({e.__class__.__name__}: {e})"
    if why is not None:
        raise WeightsUnavailableError(
            f"{model_name}: pretrained weights are not in the local cache and cannot be downloaded ({why}). "
            f"Either pass checkpoint_path=PATH to a local weights file (timm .safetensors/.pth, or Meta's "
            f"dinov2_*_pretrain.pth), or pretrained=False for a randomly initialised model.")


# ----------------------------------------------------------------------------------------- preprocessing

def model_input_size(model: nn.Module) -> Tuple[int, int]:
    """(H, W) the model was built for: ``patch_embed.img_size`` (not the pretrained config's size)."""
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is None:
        raise TypeError(f"model: expected a timm ViT with patch_embed.img_size, got {type(model).__name__}")
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


class _ToRGB:
    """Any PIL mode -> RGB; transparent pixels are composited onto white (not left as their hidden colour)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image: expected a PIL.Image.Image, got {type(image).__name__}")
        if image.mode == "RGB":
            return image
        if image.mode.startswith("I;16"):
            # 16-bit greyscale (16-bit PNG/TIFF): scale 0..65535 to 0..255, rounded. Pillow's own
            # conversion clips at 255 and would turn almost every such image white.
            image = image.convert("I").point(lambda v: v * (1 / 257) + 0.5).convert("L")
        if image.mode == "La":
            image = image.convert("LA")  # premultiplied alpha: Pillow converts it to LA only
        has_alpha = (image.mode in ("RGBA", "RGBa", "LA", "PA")
                     or (image.mode == "P" and "transparency" in image.info))
        if has_alpha:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")

    def __repr__(self) -> str:
        return "ToRGB()"


class ImageTransform:
    """PIL image (any mode) -> float tensor (3, H, W), normalised for the model. Picklable."""

    def __init__(self, timm_transform: Callable, input_size: Tuple[int, int]) -> None:
        self.to_rgb = _ToRGB()
        self.timm_transform = timm_transform
        self.input_size = input_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.timm_transform(self.to_rgb(image))

    def __repr__(self) -> str:
        return f"ImageTransform(input_size={self.input_size},\n{self.to_rgb!r},\n{self.timm_transform!r})"


def make_transform(model: nn.Module, *, augment: bool = False) -> ImageTransform:
    """Preprocessing for ``model``: mean/std/interpolation/crop from timm's data config, at the model's size.

    Args:
        model: a timm ViT (from ``load_backbone``).
        augment: timm's training augmentation (random resized crop, flip, colour jitter) at the model's
            input size instead of the deterministic resize + centre crop.

    Returns:
        A callable PIL.Image (any mode: RGB, L, RGBA, P, ...) -> float tensor (3, H, W), where (H, W)
        is the size the model was built for (``patch_embed.img_size``), not the pretrained config's.
    """
    from timm.data import create_transform, resolve_model_data_config
    input_size = model_input_size(model)
    config = resolve_model_data_config(model)
    # The trap: for DINOv2 the pretrained config says (3, 518, 518) even when built at 224.
    config["input_size"] = (3, *input_size)
    if augment:
        transform = create_transform(**config, is_training=True)
    else:
        transform = create_transform(**config)
    return ImageTransform(transform, input_size)


# ------------------------------------------------------------------------------------------------ tokens

def grid_size(model: nn.Module, image_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
    """Patch grid (Gh, Gw) the model produces for images of ``image_size`` (default: its built size)."""
    patch_embed = model.patch_embed
    if image_size is None or tuple(image_size) == model_input_size(model):
        return tuple(int(g) for g in patch_embed.grid_size)  # type: ignore[return-value]
    return tuple(int(g) for g in patch_embed.dynamic_feat_size(tuple(image_size)))  # type: ignore[return-value]


def extract_tokens(model: nn.Module, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split the final-normed tokens of a timm ViT into cue tokens and the patch grid.

    Args:
        model: a timm ViT with prefix tokens (``model.num_prefix_tokens``: [CLS] + registers).
        images: (B, 3, H, W), preprocessed (see ``make_transform``), at the model's input size unless
            the model was built with ``dynamic_img_size=True``.

    Returns:
        cue_tokens (B, P, D) with P = ``model.num_prefix_tokens`` in the model's order ([CLS], reg1, ...),
        and patch_tokens (B, Gh, Gw, D), row-major. Both are views of ``forward_features``' output: no
        copy. Gradients are not disabled here; wrap the call in ``torch.inference_mode()`` when frozen.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    num_prefix = getattr(model, "num_prefix_tokens", None)
    if num_prefix is None or not hasattr(model, "forward_features"):
        raise TypeError(f"model: expected a timm ViT with num_prefix_tokens, got {type(model).__name__}")
    in_chans = model.patch_embed.proj.in_channels
    if images.dim() != 4 or images.shape[1] != in_chans:
        raise ValueError(f"images: expected shape (B, {in_chans}, H, W), got {tuple(images.shape)}")
    size = tuple(images.shape[-2:])
    if not getattr(model.patch_embed, "dynamic_img_size", False) and size != model_input_size(model):
        raise ValueError(f"images: expected spatial size {model_input_size(model)} (the model's input size), "
                         f"got {size}; build the transform with make_transform(model)")

    tokens = model.forward_features(images)                                       # B, P + Gh*Gw, D
    B, _, D = tokens.shape
    gh, gw = grid_size(model, size)
    if tokens.shape[1] != num_prefix + gh * gw:
        raise ValueError(f"model: expected {num_prefix} + {gh}x{gw} tokens, got {tokens.shape[1]}")
    cue_tokens = tokens[:, :num_prefix]                                           # B, P, D
    patch_tokens = tokens[:, num_prefix:].reshape(B, gh, gw, D)                   # B, Gh, Gw, D
    return cue_tokens, patch_tokens
