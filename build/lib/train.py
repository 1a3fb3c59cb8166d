"""The demo: train Buddy tokens on a frozen DINOv2-with-registers ViT and measure held-out retrieval.

    python train.py                                  # generated images, about a minute on 2 CPU cores, offline
    python train.py --images ~/Pictures --viz buddies.png --metrics run.json --save buddy.safetensors
    torchrun --nproc_per_node=2 train.py ...         # several processes (gloo on CPU, nccl on GPUs)

What happens:
  1. The backbone (``--model``, ``--weights``): pretrained when the weights can be had, otherwise one
     warning line and a randomly initialised backbone. It is frozen.
  2. Images: ``--num-images`` generated pictures (smooth colour fields with a few shapes), or every
     readable image under ``--images DIR``. Images -- not views -- are split into train and held-out sets.
  3. Every image gets two random augmentations ("views", timm's training transform at the model's input
     size). The backbone runs ONCE over all views, batched, and the tokens are cached: cue tokens
     (N, 2, P, D) = [CLS] + registers, and -- since a cue's nearest patch never depends on what BuddyPool
     learns -- each cue's window of patch tokens (N, 2, P, K, D) (``BuddyPool.gather_windows``).
  4. Training touches only the cached tokens: an image is represented by 2P tokens,
     cat(cue, BuddyPool.pool_windows(windows)) -> (B, 10, D) for ViT-B/14-reg4, and MaxSimLoss is applied
     to triplets: anchor = one view of image i, positive = its other view, negative = a view of image
     j != i (plus the in-batch negatives, minus any that show image i: the loss gets image ids).
  5. Held-out retrieval (anchor view -> its positive among every held-out image's positive view, by MaxSim):
     recall@1, recall@5 and MRR for cue tokens only, cue + Buddy tokens at initialisation (plain mean of
     the 3x3 window) and cue + trained Buddy tokens.
  6. Optional outputs: ``--metrics`` (JSON), ``--viz`` (PNG of the cues' windows), ``--save`` (safetensors).

Under torchrun each process extracts tokens for its own shard of the images, BuddyPool is wrapped in
DistributedDataParallel, MaxSimLoss takes negatives from every process (``gather_distributed=True``), the
held-out tokens are gathered so that evaluation covers every held-out image exactly once, and only rank 0
prints and writes files. ``--batch-size`` is per process.

The reusable pieces (synthetic images, folder loader, split, token cache, retrieval metrics, the picture,
save/load) are plain functions below; the tests call them directly.
"""
import time

_PROCESS_START = time.perf_counter()  # before the heavy imports, so the reported total includes them

import argparse
import json
import math
import os
import random
import sys
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFont, ImageOps

from buddy_pool import BuddyPool
from maxsim_loss import MaxSimLoss, maxsim_scores
from model_utils import (DEFAULT_IMG_SIZE, DEFAULT_MODEL, WeightsUnavailableError, extract_tokens, grid_size,
                         load_backbone, make_transform, model_input_size)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
NUM_VIEWS = 2                 # views per image: anchor and positive
SAVE_FORMAT = "cls-buddy-tokens/BuddyPool"
# One colour per cue ([CLS], reg1, reg2, ...): red, yellow, blue, green, orange, purple, cyan, magenta.
CUE_COLOURS = ((230, 25, 75), (255, 225, 25), (0, 130, 200), (60, 180, 75), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230))
VIZ_MARGIN = 10               # px around and between tiles
VIZ_TILE_MIN = 320            # tiles are upscaled by an integer factor to at least this many px
DEFAULT_NUM_IMAGES = 48       # generated images: 96 ViT-B/14 passes at 224 px, ~27 s on 2 idle CPU cores
PROGRESS_EVERY_S = 5.0        # a progress line at most this often while extracting tokens

ImageSource = Union[str, Image.Image]   # a file path or an in-memory picture


class UsageError(Exception):
    """Bad user input (a flag, a file, a folder): reported as one line on stderr, exit status 2."""


# ------------------------------------------------------------------------------------------------ the CLI

class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is ONE line on stderr (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only for flags that have one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action) or ""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py", formatter_class=_HelpFormatter,
        description="Train Buddy tokens (BuddyPool + MaxSimLoss) on the cached tokens of a frozen "
                    "DINOv2-with-registers ViT and report held-out retrieval.")
    p.add_argument("--weights", default="auto", metavar="auto|hub|random|PATH",
                   help="auto: pretrained if cached or downloadable, else a warning and random weights; "
                        "hub: pretrained or fail; random; or a PATH to a local weights file "
                        "(timm .safetensors/.pth, or Meta's dinov2_*_pretrain.pth)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm model name (a ViT with [CLS] + registers)")
    p.add_argument("--img-size", type=int, metavar="PX", default=DEFAULT_IMG_SIZE,
                   help="input side the backbone is built for")
    p.add_argument("--timm-kwargs", default="{}", metavar="JSON",
                   help='extra timm.create_model arguments as a JSON object, e.g. a tiny model: '
                        '\'{"depth": 2, "embed_dim": 64, "num_heads": 2}\'')
    p.add_argument("--images", metavar="DIR", help="train on the images under DIR (recursive; jpg, jpeg, "
                   "png, webp, bmp) instead of generated ones")
    p.add_argument("--num-images", type=int, default=None, metavar="N",
                   help=f"generated images to use (default {DEFAULT_NUM_IMAGES}), or with --images at most this "
                        "many (a seeded random subset; default all)")
    p.add_argument("--held-out", type=float, default=0.3, metavar="FRACTION",
                   help="fraction of the images held out for evaluation")
    p.add_argument("--steps", type=int, metavar="N", default=100, help="training steps")
    p.add_argument("--batch-size", type=int, metavar="N", default=32,
                   help="triplets per step (per process under torchrun)")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    p.add_argument("--margin", type=float, default=0.1, help="MaxSimLoss hinge margin")
    p.add_argument("--kernel-size", type=int, metavar="K", default=3, help="Buddy window side (odd)")
    p.add_argument("--seed", type=int, default=0, help="seed for images, split, augmentations and training")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--extract-batch-size", type=int, metavar="N", default=16,
                   help="views per backbone forward pass")
    p.add_argument("--metrics", metavar="PATH", help="write the run's figures here (JSON)")
    p.add_argument("--viz", metavar="PATH.png", help="draw each cue's nearest patch and window on a few "
                   "held-out images")
    p.add_argument("--viz-images", type=int, metavar="N", default=4, help="how many held-out images --viz draws")
    p.add_argument("--save", metavar="PATH", help="write the trained BuddyPool here (safetensors + metadata)")
    p.add_argument("--load", metavar="PATH", help="start from a BuddyPool written by --save")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast for the training steps (BuddyPool + MaxSimLoss); about 0.6x the step "
                        "time on a CPU with bf16 support (see README, Performance)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the training step's BuddyPool and MaxSimLoss (backend: inductor unless "
                        "given); pays a one-off compile")
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Validate what argparse cannot; ``parser.error`` prints one line and exits with status 2."""
    for name in ("steps",):
        if getattr(args, name) < 0:
            parser.error(f"--{name}: expected >= 0, got {getattr(args, name)}")
    for name in ("batch_size", "img_size", "extract_batch_size", "viz_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")
    if args.num_images is not None and args.num_images < 2:
        parser.error(f"--num-images: expected >= 2, got {args.num_images}")
    if not (0.0 < args.held_out < 1.0):
        parser.error(f"--held-out: expected a fraction in (0, 1), got {args.held_out}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr: expected a positive number, got {args.lr}")
    if not (math.isfinite(args.margin) and args.margin >= 0):
        parser.error(f"--margin: expected a non-negative number, got {args.margin}")
    if args.kernel_size < 1 or args.kernel_size % 2 == 0:
        parser.error(f"--kernel-size: expected an odd positive int (1, 3, 5, ...), got {args.kernel_size}")
    try:
        timm_kwargs = json.loads(args.timm_kwargs)
    except json.JSONDecodeError as e:
        parser.error(f"--timm-kwargs: expected a JSON object, got {args.timm_kwargs!r} ({e})")
    if not isinstance(timm_kwargs, dict):
        parser.error(f"--timm-kwargs: expected a JSON object, got {args.timm_kwargs!r}")
    if "img_size" in timm_kwargs:
        parser.error("--timm-kwargs: img_size is set with --img-size")
    args.timm_kwargs = timm_kwargs
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            parser.error(f"--device: expected auto, cpu, cuda or cuda:N, got {args.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device: {args.device} requested but CUDA is not available")
    if args.compile is not None and args.compile not in torch.compiler.list_backends(exclude_tags=()):
        parser.error(f"--compile: expected a torch.compile backend ({', '.join(torch.compiler.list_backends())}), "
                     f"got {args.compile!r}")
    if args.viz and not args.viz.lower().endswith(".png"):
        parser.error(f"--viz: expected a path ending in .png, got {args.viz!r}")
    for flag in ("metrics", "viz", "save"):
        path = getattr(args, flag)
        if path is not None:
            folder = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(folder):
                parser.error(f"--{flag}: folder {folder} does not exist")
            if os.path.isdir(path):
                parser.error(f"--{flag}: {path} is a folder, expected a file path")
    if args.load is not None and not os.path.isfile(args.load):
        parser.error(f"--load: no such file: {args.load}")
    if args.images is not None:
        if not os.path.exists(args.images):
            parser.error(f"--images: no such folder: {args.images}")
        if not os.path.isdir(args.images):
            parser.error(f"--images: expected a folder, got a file: {args.images}")


# ------------------------------------------------------------------------------------ torch.distributed

class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not launched by torchrun)."""

    def __init__(self, device_arg: str) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank if self.world_size > 1 else torch.cuda.current_device())
        self.device = device
        self.enabled = self.world_size > 1
        if self.enabled:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[int]) -> List[int]:
        """This rank's share of ``items``: every world_size-th one, starting at its rank."""
        return list(items[self.rank::self.world_size])

    def shard_sizes(self, n: int) -> List[int]:
        """Size of every rank's shard of n items (known without communication)."""
        return [len(range(r, n, self.world_size)) for r in range(self.world_size)]

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over all processes (itself when not distributed)."""
        if not self.enabled:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world_size

    def all_true(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def gather_shards(self, shard: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Concatenate every rank's (n_r, ...) shard in rank order -> (sum n_r, ...). Shards may differ
        in length by the ``sizes`` given (all_gather needs equal shapes, so they are padded)."""
        if not self.enabled:
            return shard
        wire = shard.to(torch.uint8) if shard.dtype == torch.bool else shard  # gloo has no bool
        padded = wire.new_zeros((max(sizes), *wire.shape[1:]))
        padded[:wire.shape[0]] = wire
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(shard.dtype)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------- images

def synthetic_images(n: int, seed: int, size: int = 256) -> List[Image.Image]:
    """``n`` generated RGB pictures of ``size`` x ``size``: a smooth random colour field with 2-5 shapes.

    Image ``i`` depends only on (seed, i), not on n, so any process can make any image.
    """
    images = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        # Smooth background: a 4x4 random colour grid upsampled bicubically.
        field = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(field, "RGB").resize((size, size), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(2, 6))):
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            x0, y0 = (int(v) for v in rng.integers(0, size * 3 // 4, size=2))
            w, h = (int(v) for v in rng.integers(size // 8, size // 2, size=2))
            box = (x0, y0, min(size - 1, x0 + w), min(size - 1, y0 + h))
            kind = int(rng.integers(0, 3))
            if kind == 0:
                draw.ellipse(box, fill=colour)
            elif kind == 1:
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])], fill=colour)
        images.append(image)
    return images


def open_image(source: ImageSource) -> Image.Image:
    """A fully decoded PIL image (any mode), EXIF-rotated. Raises OSError/ValueError if unreadable."""
    if isinstance(source, Image.Image):
        return source
    with Image.open(source) as image:
        image.load()  # decode now: a truncated or corrupt file fails here, not halfway through a run
        return ImageOps.exif_transpose(image)


def find_images(root: str, warn: Callable[[str], None] = print) -> List[str]:
    """Paths of every readable image under ``root``, recursively, sorted.

    Files ending in .jpg/.jpeg/.png/.webp/.bmp (any case) are opened and decoded; one that fails is
    skipped with one ``warn`` line naming it. Hidden files and folders (name starting with ".") are
    ignored, e.g. macOS "._photo.jpg" resource forks.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        NotADirectoryError: ``root`` is a file.
        ValueError: fewer than 2 usable images.
    """
    if not os.path.exists(root):
        raise FileNotFoundError(f"--images: no such folder: {root}")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"--images: expected a folder, got a file: {root}")
    candidates = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        candidates += [os.path.join(folder, f) for f in files
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    usable = []
    for path in sorted(candidates):
        try:
            open_image(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            warn(f"warning: skipping {path}: not a readable image ({e.__class__.__name__}: {e})")
        else:
            usable.append(path)
    if len(usable) < 2:
        raise ValueError(f"--images: expected at least 2 readable images ({', '.join(IMAGE_EXTENSIONS)}) "
                         f"under {root}, found {len(usable)}")
    return usable


def split_images(n: int, held_out: float, seed: int) -> Tuple[List[int], List[int]]:
    """Split image indices 0..n-1 at random into (train, held_out), disjoint, each sorted.

    ``round(held_out * n)`` images are held out, but at least 2 (1 when n < 4) and at most n - 2 (so that
    training has an anchor and a negative; n - 1 when n == 2, where training is then skipped).
    """
    if n < 2:
        raise ValueError(f"n: expected at least 2 images, got {n}")
    n_held = max(int(round(held_out * n)), 2 if n >= 4 else 1)
    n_held = min(n_held, n - 2 if n >= 3 else n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_held:]), sorted(order[:n_held])


# ------------------------------------------------------------------------------------------------- tokens

def view_seed(seed: int, image_index: int, view: int) -> int:
    """Seed of one augmentation: depends on (seed, image, view) only, so sharding never changes a view."""
    return int(np.random.SeedSequence([seed, image_index, view]).generate_state(1)[0])


def seeded_view(transform: Callable[[Image.Image], torch.Tensor], image: Image.Image, seed: int) -> torch.Tensor:
    """``transform(image)`` with python's and torch's RNGs seeded (timm's crop draws from ``random``, torchvision's
    flip and colour jitter from torch), leaving the global RNG states as they were. Returns (3, H, W)."""
    state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            random.seed(seed)
            torch.manual_seed(seed)
            return transform(image)
    finally:
        random.setstate(state)


def extract_view_tokens(
        model: torch.nn.Module,
        sources: Sequence[ImageSource],
        indices: Sequence[int],
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        seed: int,
        views: int = NUM_VIEWS,
        batch_size: int = 16,
        device: Union[str, torch.device] = "cpu",
        log: Callable[[str], None] = print,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the frozen backbone once over ``views`` seeded augmentations of each image ``sources[i]``, i in indices.

    Returns:
        cue_tokens (n, views, P, D) and patch_tokens (n, views, Gh, Gw, D) on ``device``, n = len(indices),
        as ordinary tensors (usable in autograd later). A progress line (views done / total, rate) is
        logged every few seconds when extraction takes more than one batch.
    """
    total = len(indices) * views
    per_batch = max(1, batch_size // views)  # whole images per forward pass, so an image is opened once
    cues, patches = [], []
    start = last_print = time.perf_counter()
    done = 0
    with torch.inference_mode():
        for first in range(0, len(indices), per_batch):
            batch = []
            for i in indices[first:first + per_batch]:
                image = open_image(sources[i])
                batch += [seeded_view(transform, image, view_seed(seed, i, v)) for v in range(views)]
            cue, patch = extract_tokens(model, torch.stack(batch).to(device))        # b*V, P, D; b*V, Gh, Gw, D
            cues.append(cue.reshape(-1, views, *cue.shape[1:]))
            patches.append(patch.reshape(-1, views, *patch.shape[1:]))
            done += len(batch)
            now = time.perf_counter()
            if total > len(batch) and (now - last_print >= PROGRESS_EVERY_S or done == total):
                rate = done / (now - start)
                left = f", ~{(total - done) / rate:.0f} s left" if done < total else ""
                log(f"  tokens: {done}/{total} views, {rate:.1f} views/s{left}")
                last_print = now
    if not cues:  # an empty shard (more processes than images): empty tensors of the right shape
        P, D, (gh, gw) = model.num_prefix_tokens, model.embed_dim, grid_size(model)
        return (torch.zeros(0, views, P, D, device=device), torch.zeros(0, views, gh, gw, D, device=device))
    # Concatenate outside inference mode: the cache is then a normal tensor that training may use.
    return torch.cat(cues), torch.cat(patches)


# ---------------------------------------------------------------------------------- representation, metrics

def cache_windows(pool: BuddyPool, cue_tokens: torch.Tensor,
                  patch_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each cue's window of patches, once: BuddyPool's parameter-free half (``gather_windows``).

    The nearest patch and its window never depend on BuddyPool's parameters, so with a frozen backbone the
    training steps need only these 9 patches per cue, not the whole grid (a step then costs a fraction).

    Args:
        cue_tokens: (n, V, P, D). patch_tokens: (n, V, Gh, Gw, D).

    Returns:
        window_tokens (n, V, P, K, D) and valid (n, V, P, K), K = pool.kernel_size**2.
    """
    n, V, P, D = cue_tokens.shape
    windows, valid = pool.gather_windows(
        cue_tokens.reshape(n * V, P, D), patch_tokens.reshape(n * V, *patch_tokens.shape[2:]))
    return windows.reshape(n, V, *windows.shape[1:]), valid.reshape(n, V, *valid.shape[1:])


class CachedBuddyPool(torch.nn.Module):
    """BuddyPool's learnable half as a module of its own, for cached windows (and for DDP to wrap):
    forward(window_tokens (B, P, K, D), valid (B, P, K)) -> buddy_tokens (B, P, D)."""

    def __init__(self, pool: BuddyPool) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, window_tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.pool.pool_windows(window_tokens, valid)


def represent(cue_tokens: torch.Tensor, window_tokens: torch.Tensor, valid: torch.Tensor,
              buddy: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]) -> torch.Tensor:
    """Token set of each image: cue (B, P, D) alone when ``buddy`` is None, else cat(cue, Buddy) (B, 2P, D).

    window_tokens (B, P, K, D), valid (B, P, K): from ``cache_windows``. ``buddy``: ``pool.pool_windows``, or a
    ``CachedBuddyPool`` (possibly DDP-wrapped)."""
    if buddy is None:
        return cue_tokens
    return torch.cat([cue_tokens, buddy(window_tokens, valid)], dim=1)


def retrieval_metrics(scores: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Recall@k and MRR from a (Q, Q) score matrix whose correct candidate for query i is column i.

    The rank of the correct candidate is 1 + the number of other candidates scoring at least as high
    (ties count against the query: a constant score matrix gives recall@1 = 0 when Q > 1).
    """
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores: expected a square (Q, Q) matrix, got {tuple(scores.shape)}")
    correct = scores.diagonal().unsqueeze(1)                                        # Q, 1
    others = ~torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)   # Q, Q
    rank = 1 + ((scores >= correct) & others).sum(dim=1)                           # Q
    metrics = {f"recall@{k}": (rank <= k).float().mean().item() for k in ks}
    metrics["mrr"] = (1.0 / rank.float()).mean().item()
    return metrics


@torch.no_grad()
def evaluate(cue_tokens: torch.Tensor, window_tokens: torch.Tensor, valid: torch.Tensor,
             pool: Optional[BuddyPool]) -> Dict[str, float]:
    """Held-out retrieval: view 0 of each image queries view 1 of every image, by MaxSim.

    cue_tokens (n, 2, P, D), window_tokens (n, 2, P, K, D), valid (n, 2, P, K) (``cache_windows``);
    pool None = cue tokens only -> {"recall@1", "recall@5", "mrr"}.
    """
    buddy = None if pool is None else pool.pool_windows
    queries = represent(cue_tokens[:, 0], window_tokens[:, 0], valid[:, 0], buddy)    # n, N, D
    docs = represent(cue_tokens[:, 1], window_tokens[:, 1], valid[:, 1], buddy)       # n, N, D
    return retrieval_metrics(maxsim_scores(queries, docs))


# ----------------------------------------------------------------------------------------------- training

def sample_triplets(n: int, batch_size: int, generator: torch.Generator) -> Tuple[torch.Tensor, ...]:
    """Indices of ``batch_size`` <= n triplets over n cached images with 2 views each.

    Returns image and view indices (each (B,)) for anchor, positive and negative: distinct anchor images,
    the positive is the anchor image's other view, the negative a random view of a different image.
    """
    anchor = torch.randperm(n, generator=generator)[:batch_size]                           # B
    anchor_view = torch.randint(0, NUM_VIEWS, (batch_size,), generator=generator)          # B
    negative = (anchor + torch.randint(1, n, (batch_size,), generator=generator)) % n      # B, never the anchor
    negative_view = torch.randint(0, NUM_VIEWS, (batch_size,), generator=generator)        # B
    return anchor, anchor_view, anchor, 1 - anchor_view, negative, negative_view


def train_pool(buddy: torch.nn.Module, cue_tokens: torch.Tensor, window_tokens: torch.Tensor, valid: torch.Tensor,
               *, steps: int, batch_size: int, lr: float, loss_fn: torch.nn.Module, generator: torch.Generator,
               ddp: Dist, image_ids: Optional[Sequence[int]] = None, autocast_dtype: Optional[torch.dtype] = None,
               log: Callable[[str], None] = print) -> List[float]:
    """Train ``buddy`` (a CachedBuddyPool, or one wrapped in DDP) with AdamW on cached tokens.

    cue_tokens (n, 2, P, D), window_tokens (n, 2, P, K, D) and valid (n, 2, P, K) are this process's training
    images, and ``image_ids`` (n,) their ids across all processes (default 0..n-1): the loss leaves out in-batch
    "negatives" that show the anchor's own image. ``autocast_dtype`` (e.g. torch.bfloat16) runs the forward
    under autocast. Returns the loss of every step (averaged over processes).
    """
    optimizer = torch.optim.AdamW(buddy.parameters(), lr=lr, weight_decay=0.0)
    n = cue_tokens.shape[0]
    device = cue_tokens.device
    ids = torch.as_tensor(list(range(n)) if image_ids is None else list(image_ids), dtype=torch.long, device=device)
    losses = []
    log_every = max(1, steps // 10)
    for step in range(1, steps + 1):
        a, av, p, pv, ng, nv = (t.to(device) for t in sample_triplets(n, batch_size, generator))
        images = torch.cat([a, p, ng])                                               # 3B
        views = torch.cat([av, pv, nv])                                              # 3B
        # One forward for anchors, positives and negatives: a single DDP forward per backward.
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            tokens = represent(cue_tokens[images, views], window_tokens[images, views], valid[images, views],
                               buddy)                                                # 3B, 2P, D
            anchor, positive, negative = tokens.chunk(3)
            # Another triplet's negative may show this anchor's image (likely when images are few): ids drop it.
            loss = loss_fn(anchor, positive, negative, anchor_ids=ids[a], negative_ids=ids[ng])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(ddp.mean(loss.detach()))  # no .item() here: no host sync per step on a GPU
        if step == 1 or step % log_every == 0 or step == steps:
            log(f"  step {step:4d}/{steps}  loss {losses[-1].item():.4f}")
    return torch.stack(losses).tolist() if losses else []


# ------------------------------------------------------------------------------------------------ picture

def cue_names(num_cues: int) -> List[str]:
    """["[CLS]", "reg1", "reg2", ...] for num_cues prefix tokens."""
    return ["[CLS]"] + [f"reg{i}" for i in range(1, num_cues)]


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def viz_line_width(cell: int, kernel_size: int, num_cues: int) -> int:
    """Outline width so that num_cues nested outlines (each with a 1 px dark edge on both sides) fit inside the
    smallest, corner-clipped, window of ``(kernel_size // 2 + 1) * cell`` px."""
    smallest_window = (kernel_size // 2 + 1) * cell
    return max(1, min(4, smallest_window // (2 * num_cues) - 2))


def outline_inset(cue: int, line: int) -> int:
    """Inset of cue ``cue``'s coloured outline from its window's border: nested outlines never overlap."""
    return cue * (line + 2) + 1


def window_box(centre: int, grid: Tuple[int, int], kernel_size: int, tile_hw: Tuple[int, int],
               inset: int) -> Tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), inclusive, of the window around patch ``centre`` (row-major) on a tile of
    tile_hw = (H, W) px showing a grid of (Gh, Gw) patches, clipped to the grid and shrunk by ``inset`` px."""
    gh, gw = grid
    th, tw = tile_hw
    r, c = divmod(int(centre), gw)
    half = kernel_size // 2
    r0, r1 = max(0, r - half), min(gh - 1, r + half)
    c0, c1 = max(0, c - half), min(gw - 1, c + half)
    return (c0 * tw // gw + inset, r0 * th // gh + inset,
            (c1 + 1) * tw // gw - 1 - inset, (r1 + 1) * th // gh - 1 - inset)


def render_viz(images: Sequence[Image.Image], centres: torch.Tensor, grid: Tuple[int, int], kernel_size: int,
               captions: Optional[Sequence[str]] = None,
               title: Optional[str] = None) -> Tuple[Image.Image, Dict[str, Any]]:
    """Draw each cue's chosen patch and window on each image, side by side, with a legend.

    Args:
        images: n RGB images, all the model's input size (what the backbone saw).
        centres: (n, C) row-major nearest-patch indices (``BuddyPool.nearest_patch``).
        grid: (Gh, Gw) patch grid.
        kernel_size: window side.
        captions: n short labels under the tiles.
        title: the line above the tiles (default: what the outlines and dots mean).

    Returns:
        The picture, and its layout: {"scale", "tile" (H, W), "origins" [(x, y) of each tile], "line"}.
        Cue c's window outline is ``window_box(centre, grid, kernel_size, tile, outline_inset(c, line))`` on
        the tile, drawn ``line`` px wide inwards from that box with a 1 px dark edge on each side, cue 0 first:
        cues that share a window get nested outlines, none hiding another (in windows too small for that,
        e.g. kernel_size=1 on a fine grid, the insets are clamped and outlines may overlap).
    """
    if title is None:
        title = (f"each cue's nearest patch (dot) and its {kernel_size}x{kernel_size} window "
                 f"(outlines nest inwards where cues share a window)")
    n, num_cues = centres.shape
    if n != len(images) or n == 0:
        raise ValueError(f"centres: expected ({len(images)}, C) for {len(images)} images, got {tuple(centres.shape)}")
    w, h = images[0].size
    scale = max(1, math.ceil(VIZ_TILE_MIN / max(w, h)))
    tile_w, tile_h = w * scale, h * scale
    line = viz_line_width(min(tile_w // grid[1], tile_h // grid[0]), kernel_size, num_cues)
    font = _font(14)
    text_h = 20
    width = VIZ_MARGIN + n * (tile_w + VIZ_MARGIN)
    height = VIZ_MARGIN + text_h + tile_h + text_h + text_h + VIZ_MARGIN
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((VIZ_MARGIN, VIZ_MARGIN), title, fill=(0, 0, 0), font=font)
    origins = []
    dot = max(2, min(tile_w // grid[1], tile_h // grid[0]) // 5)
    for k, image in enumerate(images):
        x, y = VIZ_MARGIN + k * (tile_w + VIZ_MARGIN), VIZ_MARGIN + text_h
        origins.append((x, y))
        canvas.paste(image.convert("RGB").resize((tile_w, tile_h), Image.Resampling.BICUBIC), (x, y))
        for c in range(num_cues):
            colour = CUE_COLOURS[c % len(CUE_COLOURS)]
            x0, y0, x1, y1 = window_box(int(centres[k, c]), grid, kernel_size, (tile_h, tile_w), inset=0)
            # Nested outlines need room; in a window too small for all of them (k=1 on a fine grid) they overlap.
            inset = max(1, min(outline_inset(c, line), (min(x1 - x0, y1 - y0) + 1) // 2 - line - 1))
            # A dark edge on both sides keeps the colour readable on any photo.
            x0, y0, x1, y1 = window_box(int(centres[k, c]), grid, kernel_size, (tile_h, tile_w), inset=inset - 1)
            draw.rectangle((x + x0, y + y0, x + x1, y + y1), outline=(0, 0, 0), width=line + 2)
            x0, y0, x1, y1 = window_box(int(centres[k, c]), grid, kernel_size, (tile_h, tile_w), inset=inset)
            draw.rectangle((x + x0, y + y0, x + x1, y + y1), outline=colour, width=line)
        for c in range(num_cues):  # dots after all outlines, so no outline hides a chosen patch
            colour = CUE_COLOURS[c % len(CUE_COLOURS)]
            r, col = divmod(int(centres[k, c]), grid[1])
            cx = x + (2 * col + 1) * tile_w // (2 * grid[1])
            cy = y + (2 * r + 1) * tile_h // (2 * grid[0])
            draw.ellipse((cx - dot, cy - dot, cx + dot, cy + dot), fill=colour, outline=(0, 0, 0))
        if captions is not None:
            draw.text((x, y + tile_h + 3), str(captions[k])[:max(8, tile_w // 8)], fill=(0, 0, 0), font=font)
    # Legend: a swatch and the name of every cue.
    lx, ly = VIZ_MARGIN, VIZ_MARGIN + text_h + tile_h + text_h + 2
    for c, name in enumerate(cue_names(num_cues)):
        draw.rectangle((lx, ly, lx + 14, ly + 14), fill=CUE_COLOURS[c % len(CUE_COLOURS)], outline=(0, 0, 0))
        draw.text((lx + 20, ly), name, fill=(0, 0, 0), font=font)
        lx += 20 + int(draw.textlength(name, font=font)) + 16
    return canvas, {"scale": scale, "tile": (tile_h, tile_w), "origins": origins, "line": line}


def to_pil(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> Image.Image:
    """Undo the normalisation of a (3, H, W) model input -> RGB PIL image of (W, H)."""
    pixels = image.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, "RGB")


# ----------------------------------------------------------------------------------------------- save/load

def save_pool(pool: BuddyPool, path: str, *, backbone: str, img_size: int) -> None:
    """Write ``pool``'s parameters and what rebuilds it (dim, kernel size, backbone, image size) as safetensors.

    Written to a temporary file in the same folder and renamed, so an interrupted run never leaves a
    half-written file at ``path``.
    """
    from safetensors.torch import save_file
    tensors = {k: v.detach().cpu().contiguous() for k, v in pool.state_dict().items()}
    metadata = {"format": SAVE_FORMAT, "dim": str(pool.dim), "kernel_size": str(pool.kernel_size),
                "backbone": backbone, "img_size": str(img_size)}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_pool(path: str, *, dim: int, kernel_size: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Read a file written by ``save_pool``: (state dict, metadata). Never unpickles.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a saved BuddyPool, or one built for another ``dim`` or ``kernel_size``.
    """
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--load: no such file: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a file that is not safetensors
        raise ValueError(f"--load: {path} is not a BuddyPool file written by --save ({e.__class__.__name__}: "
                         f"{e})") from None
    if metadata.get("format") != SAVE_FORMAT:
        raise ValueError(f"--load: {path} is not a BuddyPool file written by --save (no {SAVE_FORMAT!r} metadata)")
    saved = (int(metadata["dim"]), int(metadata["kernel_size"]))
    if saved != (dim, kernel_size):
        raise ValueError(f"--load: {path} holds a BuddyPool for dim {saved[0]}, kernel size {saved[1]} "
                         f"(backbone {metadata.get('backbone')} at {metadata.get('img_size')} px); this run needs "
                         f"dim {dim}, kernel size {kernel_size}")
    return state, metadata


def write_json(path: str, data: Dict[str, Any]) -> None:
    """JSON to a temporary file, then renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -------------------------------------------------------------------------------------------------- the run

def _first_sentence(message: str) -> str:
    """The library's error without its API advice ("Either pass checkpoint_path=..."), which a CLI user cannot use."""
    return message.split(" Either ")[0].rstrip(". ")


def load_model(args: argparse.Namespace, ddp: Dist, warn: Callable[[str], None]) -> Tuple[torch.nn.Module,
                                                                                        Dict[str, Any]]:
    """The frozen backbone as ``--weights`` asks, and what was actually used: {"requested", "used", ...}."""
    kwargs = dict(img_size=args.img_size, device=ddp.device, **args.timm_kwargs)
    info: Dict[str, Any] = {"requested": args.weights, "used": None, "checkpoint": None, "fallback_reason": None}

    def build(**how: Any) -> torch.nn.Module:
        torch.manual_seed(args.seed)  # random weights: identical in every process, and run to run
        return load_backbone(args.model, **how, **kwargs)

    try:
        if args.weights == "random":
            model, info["used"] = build(pretrained=False), "random"
        elif args.weights == "hub":
            model, info["used"] = build(pretrained=True), "pretrained"
        elif args.weights == "auto":
            try:
                model, info["used"] = build(pretrained=True), "pretrained"
            except WeightsUnavailableError as e:  # fails in seconds offline: no retry storm
                info["used"], info["fallback_reason"] = "random", str(e)
            # Every process must use the same weights: if any one fell back, all do.
            if not ddp.all_true(info["used"] == "pretrained"):
                info["used"] = "random"
                info["fallback_reason"] = info["fallback_reason"] or "another process could not get the weights"
                warn(f"warning: {_first_sentence(info['fallback_reason'])}; continuing with a RANDOMLY "
                     f"INITIALISED backbone, so retrieval will be weak (--weights PATH loads a local file, "
                     f"--weights random silences this warning)")
                model = build(pretrained=False)
        else:
            model = build(checkpoint_path=args.weights)
            info["used"], info["checkpoint"] = "checkpoint", args.weights
    except WeightsUnavailableError as e:
        raise UsageError(f"--weights {args.weights}: {_first_sentence(str(e))}; use --weights PATH for a local "
                         f"file, or --weights random") from None
    except FileNotFoundError as e:
        raise UsageError(f"--weights: {e}") from None
    except (ValueError, TypeError) as e:  # unknown model name, bad timm kwargs, a file that does not fit
        raise UsageError(f"--model/--weights/--timm-kwargs: {e}") from None
    if not (getattr(model, "num_prefix_tokens", 0) >= 1 and hasattr(model, "patch_embed")):
        raise UsageError(f"--model: expected a timm ViT with [CLS]/register tokens, got {args.model}")
    return model, info


def run(args: argparse.Namespace) -> Dict[str, Any]:
    t_start = time.perf_counter()
    timings: Dict[str, float] = {"imports": t_start - _PROCESS_START}
    ddp = Dist(args.device)
    try:
        return _run(args, ddp, timings)
    finally:
        ddp.close()


def _run(args: argparse.Namespace, ddp: Dist, timings: Dict[str, float]) -> Dict[str, Any]:
    def log(message: str) -> None:
        if ddp.is_main:
            print(message, flush=True)

    def warn(message: str) -> None:
        if ddp.is_main:
            print(message, file=sys.stderr, flush=True)

    # --- a folder of images is checked first: a bad one should fail before the backbone loads
    t = time.perf_counter()
    if args.images:
        try:
            sources: List[ImageSource] = list(find_images(args.images, warn=warn))
        except (FileNotFoundError, NotADirectoryError, ValueError) as e:
            raise UsageError(str(e)) from None
        found = len(sources)
        if args.num_images is not None and args.num_images < found:
            keep = torch.randperm(found, generator=torch.Generator().manual_seed(args.seed))[:args.num_images]
            sources = [sources[i] for i in sorted(keep.tolist())]
        source_desc = f"{len(sources)} of {found} images under {args.images}"
    timings["load_images"] = time.perf_counter() - t

    # --- backbone
    t = time.perf_counter()
    model, weights = load_model(args, ddp, warn)
    P, D = model.num_prefix_tokens, model.embed_dim
    grid = grid_size(model)
    timings["load_backbone"] = time.perf_counter() - t
    start_state = None
    if args.load:
        try:
            start_state, loaded_meta = load_pool(args.load, dim=D, kernel_size=args.kernel_size)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(str(e)) from None
        if loaded_meta.get("backbone") != args.model or loaded_meta.get("img_size") != str(args.img_size):
            warn(f"warning: --load {args.load} was trained on {loaded_meta.get('backbone')} at "
                 f"{loaded_meta.get('img_size')} px; this run uses {args.model} at {args.img_size} px")

    # --- generated images, at (about) the model's input size
    if not args.images:
        t = time.perf_counter()
        n = args.num_images if args.num_images is not None else DEFAULT_NUM_IMAGES
        sources = list(synthetic_images(n, args.seed, size=max(64, max(model_input_size(model)))))
        source_desc = f"{n} generated images (seed {args.seed})"
        timings["load_images"] = time.perf_counter() - t
    train_ids, held_ids = split_images(len(sources), args.held_out, args.seed)

    log("CLS + Buddy tokens demo")
    log(f"  backbone  {args.model} @ {args.img_size} px: {P} cue tokens, {grid[0]}x{grid[1]} patches, dim {D}, "
        f"weights: {weights['used']}" + (f" ({weights['checkpoint']})" if weights["checkpoint"] else ""))
    log(f"  images    {source_desc}: {len(train_ids)} train, {len(held_ids)} held out, {NUM_VIEWS} views each")
    log(f"  device    {ddp.device}, {ddp.world_size} process{'es' if ddp.world_size > 1 else ''}")

    # --- tokens, once: each process its own shard of the train and held-out images
    t = time.perf_counter()
    transform = make_transform(model, augment=True)
    my_train, my_held = ddp.shard(train_ids), ddp.shard(held_ids)
    log(f"extracting tokens of {NUM_VIEWS * (len(train_ids) + len(held_ids))} views"
        + (f" ({NUM_VIEWS * (len(my_train) + len(my_held))} in each of {ddp.world_size} processes)"
           if ddp.enabled else "") + " ...")
    cue, patches = extract_view_tokens(model, sources, my_train + my_held, transform, seed=args.seed,
                                       batch_size=args.extract_batch_size, device=ddp.device, log=log)
    # BuddyPool's windows never depend on its parameters: cache them too, and drop the patch grids.
    pool = BuddyPool(D, kernel_size=args.kernel_size).to(ddp.device)
    windows, valid = cache_windows(pool, cue, patches)                                # n, 2, P, K, D; n, 2, P, K
    del patches
    train_cue, train_windows, train_valid = cue[:len(my_train)], windows[:len(my_train)], valid[:len(my_train)]
    # Evaluation needs every held-out image once, in every process: gather the shards, then restore order.
    held_sizes = ddp.shard_sizes(len(held_ids))
    held_cue = ddp.gather_shards(cue[len(my_train):], held_sizes)
    held_windows = ddp.gather_shards(windows[len(my_train):], held_sizes)
    held_valid = ddp.gather_shards(valid[len(my_train):], held_sizes)
    gathered_ids = [i for r in range(ddp.world_size) for i in held_ids[r::ddp.world_size]]
    order = sorted(range(len(gathered_ids)), key=gathered_ids.__getitem__)
    held_cue, held_windows, held_valid = held_cue[order], held_windows[order], held_valid[order]
    timings["extract_tokens"] = time.perf_counter() - t
    log(f"  done in {timings['extract_tokens']:.1f} s "
        f"({NUM_VIEWS * (len(my_train) + len(my_held)) / max(timings['extract_tokens'], 1e-9):.1f} views/s"
        + (" per process)" if ddp.enabled else ")"))

    # --- train BuddyPool on the cached tokens
    if start_state is not None:
        pool.load_state_dict(start_state)
    before = evaluate(held_cue, held_windows, held_valid, pool)
    log(f"held-out recall@1 before training: {before['recall@1']:.3f} "
        f"(cue + {'loaded' if start_state is not None else 'initial'} Buddy tokens, {len(held_ids)} candidates)")

    t = time.perf_counter()
    min_shard = min(ddp.shard_sizes(len(train_ids)))
    steps = args.steps
    if steps > 0 and min_shard < 2:
        warn(f"warning: training skipped: each process needs at least 2 training images, the smallest shard has "
             f"{min_shard}")
        steps = 0
    batch_size = min(args.batch_size, min_shard)
    losses: List[float] = []
    if steps > 0:
        if batch_size < args.batch_size:
            log(f"  (batch size {batch_size}: the number of training images per process)")
        trainable: torch.nn.Module = CachedBuddyPool(pool)
        if ddp.enabled:
            from torch.nn.parallel import DistributedDataParallel
            trainable = DistributedDataParallel(trainable, device_ids=[ddp.device.index] if ddp.device.type == "cuda"
                                                else None)
        loss_fn: torch.nn.Module = MaxSimLoss(margin=args.margin, gather_distributed=ddp.enabled)
        if args.compile:  # opt-in: helps a little alone, about 2x with --bf16 (README, Performance)
            trainable, loss_fn = (torch.compile(trainable, backend=args.compile),
                                  torch.compile(loss_fn, backend=args.compile))
        generator = torch.Generator().manual_seed(args.seed + 1 + ddp.rank)
        n_params = sum(p.numel() for p in pool.parameters())
        log(f"training BuddyPool ({n_params:,} parameters) for {steps} steps, batch {batch_size}"
            + (f" x {ddp.world_size} processes" if ddp.enabled else "") + f", lr {args.lr:g}, on cached tokens")
        losses = train_pool(trainable, train_cue, train_windows, train_valid, steps=steps, batch_size=batch_size,
                            lr=args.lr, loss_fn=loss_fn, generator=generator, ddp=ddp, image_ids=my_train,
                            autocast_dtype=torch.bfloat16 if args.bf16 else None, log=log)
    timings["train"] = time.perf_counter() - t

    # --- the ablation, on every held-out image
    t = time.perf_counter()
    ablation = {
        "cue_only": evaluate(held_cue, held_windows, held_valid, None),
        "cue_buddy_init": evaluate(held_cue, held_windows, held_valid,
                                   BuddyPool(D, kernel_size=args.kernel_size).to(ddp.device)),
        "cue_buddy_trained": evaluate(held_cue, held_windows, held_valid, pool),
    }
    timings["evaluate"] = time.perf_counter() - t
    after = ablation["cue_buddy_trained"]
    log(f"held-out recall@1 after training:  {after['recall@1']:.3f}")
    log("")
    log(f"held-out retrieval: {len(held_ids)} images, anchor view -> its positive among {len(held_ids)} "
        f"candidates (MaxSim)")
    log(f"  {'representation':<30} {'tokens':>6} {'recall@1':>9} {'recall@5':>9} {'MRR':>7}")
    for key, label, tokens in (("cue_only", "cue only", P),
                               ("cue_buddy_init", "cue + Buddy at init (mean)", 2 * P),
                               ("cue_buddy_trained", "cue + trained Buddy", 2 * P)):
        m = ablation[key]
        log(f"  {label:<30} {tokens:>6} {m['recall@1']:>9.3f} {m['recall@5']:>9.3f} {m['mrr']:>7.3f}")
    log("")

    # --- outputs, rank 0 only
    viz_info = None
    if args.viz and ddp.is_main:
        t = time.perf_counter()
        viz_info = write_viz(args.viz, model, sources, held_ids[:args.viz_images], pool, args.kernel_size,
                             ddp.device, captions=[os.path.basename(s) if isinstance(s, str) else f"held-out #{i}"
                                                   for i, s in ((i, sources[i]) for i in held_ids[:args.viz_images])])
        timings["viz"] = time.perf_counter() - t
        log(f"wrote {args.viz}")
    if args.save and ddp.is_main:
        save_pool(pool, args.save, backbone=args.model, img_size=args.img_size)
        log(f"wrote {args.save}")
    timings["total"] = time.perf_counter() - _PROCESS_START

    results = {
        "model": args.model, "img_size": args.img_size, "timm_kwargs": args.timm_kwargs,
        "weights": weights,
        "tokens": {"cue": P, "grid": list(grid), "dim": D, "per_image": 2 * P},
        "data": {"source": "folder" if args.images else "synthetic", "images": len(sources),
                 "train_images": len(train_ids), "held_out_images": len(held_ids), "views_per_image": NUM_VIEWS,
                 "held_out_ids": held_ids, "held_out_evaluated": int(held_cue.shape[0])},
        "training": {"steps": steps, "batch_size": batch_size, "lr": args.lr, "margin": args.margin,
                     "kernel_size": args.kernel_size, "loaded": args.load, "world_size": ddp.world_size,
                     "bf16": args.bf16, "compile": args.compile},
        "losses": losses,
        "recall@1_before": before["recall@1"], "recall@1_after": after["recall@1"],
        "ablation": ablation,
        "viz": viz_info,
        "device": str(ddp.device), "world_size": ddp.world_size, "written_by_rank": ddp.rank, "seed": args.seed,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    if args.metrics and ddp.is_main:
        write_json(args.metrics, results)
        log(f"wrote {args.metrics}")
    loss_text = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, " if losses else ""
    log(f"summary: held-out recall@1 {before['recall@1']:.3f} -> {after['recall@1']:.3f} after {steps} steps "
        f"({loss_text}cue only {ablation['cue_only']['recall@1']:.3f}); weights {weights['used']}; "
        f"{timings['total']:.1f} s")
    return results


def write_viz(path: str, model: torch.nn.Module, sources: Sequence[ImageSource], ids: Sequence[int],
              pool: BuddyPool, kernel_size: int, device: torch.device, captions: Sequence[str]) -> Dict[str, Any]:
    """Run the backbone on the plain (resized + centre-cropped) held-out images ``ids``, draw their cues' windows,
    write the PNG (temp file + rename). Returns what was drawn: image ids, nearest-patch indices, layout."""
    from timm.data import resolve_model_data_config
    config = resolve_model_data_config(model)
    transform = make_transform(model)
    batch = torch.stack([transform(open_image(sources[i])) for i in ids])            # n, 3, H, W
    with torch.inference_mode():
        cue, patches = extract_tokens(model, batch.to(device))
        centres = pool.nearest_patch(cue, patches).cpu()                              # n, C
    images = [to_pil(x, config["mean"], config["std"]) for x in batch]
    picture, layout = render_viz(images, centres, grid_size(model), kernel_size, captions=captions)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        picture.save(tmp, format="PNG", optimize=True)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    files = [sources[i] if isinstance(sources[i], str) else None for i in ids]
    return {"path": path, "image_ids": list(ids), "files": files, "nearest_patch": centres.tolist(),
            "size": list(picture.size),
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in layout.items()}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
    try:
        run(args)
    except UsageError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
