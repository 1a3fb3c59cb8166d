"""Buddy tokens: a local partner for each global cue token.

A ViT with registers gives, per image, a few global *cue* tokens ([CLS] + registers, shape (B, C, D))
and a grid of *patch* tokens (B, H, W, D). For every cue we find the patch it is most similar to
(cosine similarity; the first one in row-major order on ties) and pool the kernel_size x kernel_size
window of patches centred there into a *Buddy token*. Windows are clipped at the grid border: only
patches inside the grid take part, so a corner window at kernel_size=3 averages 4 patches.

At initialisation a Buddy token is exactly the plain mean of its window. Two things are learnable so
that there is something to train on top of a frozen backbone, and both start as the identity:

- ``window_logits`` (kernel_size**2,): one logit per window offset, shared by all cues. The pooling
  weights are a softmax over the logits of the offsets that fall inside the grid; zero logits give the
  plain mean, and training can learn to favour, say, the centre patch over the ring around it.
- ``proj``: a D x D linear map added as a residual, ``buddy = pooled + proj(pooled)``, with weight and
  bias zero-initialised, so it starts as a no-op and can learn to re-mix channels of the local token
  (for example to make it more distinct from its cue).

The nearest-patch search is an argmax and carries no gradient; gradients flow into the pooled patch
features, the window logits and the projection.

This file depends on torch only: copy it into any project.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BuddyPool", "nearest_patch"]


def _check_tokens(cue_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> None:
    """Validate the (B, C, D) cue and (B, H, W, D) patch tensors at the API boundary."""
    if not isinstance(cue_tokens, torch.Tensor):
        raise TypeError(f"cue_tokens: expected a torch.Tensor, got {type(cue_tokens).__name__}")
    if not isinstance(patch_tokens, torch.Tensor):
        raise TypeError(f"patch_tokens: expected a torch.Tensor, got {type(patch_tokens).__name__}")
    if cue_tokens.dim() != 3:
        raise ValueError(f"cue_tokens: expected shape (B, C, D), got {tuple(cue_tokens.shape)}")
    if patch_tokens.dim() != 4:
        raise ValueError(f"patch_tokens: expected shape (B, H, W, D), got {tuple(patch_tokens.shape)}")
    B, C, D = cue_tokens.shape
    if patch_tokens.shape[0] != B or patch_tokens.shape[3] != D:
        raise ValueError(
            f"patch_tokens: expected batch {B} and dim {D} to match cue_tokens {tuple(cue_tokens.shape)}, "
            f"got {tuple(patch_tokens.shape)}")
    if patch_tokens.shape[1] < 1 or patch_tokens.shape[2] < 1:
        raise ValueError(f"patch_tokens: expected a grid of at least 1x1, got {tuple(patch_tokens.shape)}")
    if not (cue_tokens.is_floating_point() and patch_tokens.is_floating_point()):
        raise TypeError(
            f"cue_tokens/patch_tokens: expected floating point tensors, got {cue_tokens.dtype} and "
            f"{patch_tokens.dtype}")


def nearest_patch(cue_tokens: torch.Tensor, patch_tokens: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Row-major index of the patch most cosine-similar to each cue.

    Args:
        cue_tokens: (B, C, D).
        patch_tokens: (B, H, W, D).
        eps: floor on the norms, so an all-zero token does not divide by zero.

    Returns:
        (B, C) int64 indices in [0, H * W); ``index // W`` is the row, ``index % W`` the column.
        Ties go to the first patch in row-major order (``torch.argmax`` semantics).
    """
    _check_tokens(cue_tokens, patch_tokens)
    B, H, W, D = patch_tokens.shape
    patches = patch_tokens.reshape(B, H * W, D)                                  # B, HW, D
    # Cosine similarity without materialising a normalised copy of the (large) patch tensor:
    # normalise the few cues, take dot products, then divide by each patch's norm.
    # (Patches on the left of the bmm: the contiguous operand streams, ~1.5x faster than cues @ patches^T.)
    cues = F.normalize(cue_tokens, dim=-1, eps=eps)                              # B, C, D
    dots = torch.bmm(patches, cues.transpose(1, 2))                              # B, HW, C
    patch_norms = torch.linalg.vector_norm(patches, dim=-1).clamp_min(eps)       # B, HW
    return (dots / patch_norms.unsqueeze(-1)).argmax(dim=1)                      # B, C


class BuddyPool(nn.Module):
    """Pool a kernel_size x kernel_size window around each cue's nearest patch into a Buddy token.

    Args:
        dim: token dimension D.
        kernel_size: odd window side k (1, 3, 5, ...); k=1 takes the nearest patch itself.

    Shapes:
        forward(cue_tokens (B, C, D), patch_tokens (B, H, W, D)) -> buddy_tokens (B, C, D)

    Any batch size, number of cues and grid size (down to 1x1, square or not) work. The forward pass is
    vectorised (no Python loop over batch, cues or patches), never syncs with the host, and compiles
    with ``torch.compile(fullgraph=True)``. Parameters and inputs share one dtype (float32, float16 or
    bfloat16: use ``module.to(dtype)``), or run under autocast.
    """

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
                or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd positive int (1, 3, 5, ...), got {kernel_size!r}")
        self.dim = dim
        self.kernel_size = kernel_size
        # One logit per window offset; zeros make the masked softmax the plain mean.
        self.window_logits = nn.Parameter(torch.zeros(kernel_size * kernel_size))
        # Residual projection, zero so that it starts as a no-op.
        self.proj = nn.Linear(dim, dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        # Window offsets in row-major order: (dy, dx) for dy, dx in [-k//2, k//2].
        r = kernel_size // 2
        offsets = torch.arange(-r, r + 1)
        self.register_buffer("offset_y", offsets.repeat_interleave(kernel_size), persistent=False)  # K
        self.register_buffer("offset_x", offsets.repeat(kernel_size), persistent=False)             # K

    def extra_repr(self) -> str:
        return f"dim={self.dim}, kernel_size={self.kernel_size}"

    def nearest_patch(self, cue_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, C) row-major index of each cue's nearest patch; see :func:`nearest_patch`."""
        return nearest_patch(cue_tokens, patch_tokens)

    def window(self, centre: torch.Tensor, grid_size: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Row-major indices and in-grid mask of the window around each centre.

        Args:
            centre: (B, C) row-major patch indices.
            grid_size: (H, W).

        Returns:
            index (B, C, K) int64, clamped into the grid, and valid (B, C, K) bool, with K = kernel_size**2.
        """
        H, W = grid_size
        rows = (centre // W).unsqueeze(-1) + self.offset_y                        # B, C, K
        cols = (centre % W).unsqueeze(-1) + self.offset_x                         # B, C, K
        valid = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)               # B, C, K
        index = rows.clamp(0, H - 1) * W + cols.clamp(0, W - 1)                   # B, C, K
        return index, valid

    def gather_windows(self, cue_tokens: torch.Tensor,
                       patch_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The first, parameter-free half of ``forward``: each cue's window of patches.

        Args:
            cue_tokens: (B, C, D).
            patch_tokens: (B, H, W, D).

        Returns:
            window_tokens (B, C, K, D), the K = kernel_size**2 patches around each cue's nearest patch in
            row-major window order (out-of-grid cells hold a clamped copy of a border patch), and valid
            (B, C, K) bool, True for cells inside the grid.

        With a frozen backbone this never changes during training: compute it once, cache it (9 patches
        per cue instead of the whole grid) and train on ``pool_windows`` alone.
        """
        _check_tokens(cue_tokens, patch_tokens)
        B, H, W, D = patch_tokens.shape
        if D != self.dim:
            raise ValueError(f"patch_tokens: expected dim {self.dim}, got {tuple(patch_tokens.shape)}")
        C = cue_tokens.shape[1]
        K = self.kernel_size * self.kernel_size
        with torch.no_grad():  # the choice of patch is discrete: no gradient through the argmax
            centre = nearest_patch(cue_tokens, patch_tokens)                      # B, C
        index, valid = self.window(centre, (H, W))                                # B, C, K
        # Gather only the B*C*K window patches instead of touching the whole grid per cue: whole rows of
        # D by flat index (index_select copies rows; gather with an expanded index is ~10x slower on CPU).
        flat_index = index + (torch.arange(B, device=index.device) * (H * W)).view(B, 1, 1)    # B, C, K
        window_tokens = patch_tokens.reshape(B * H * W, D).index_select(0, flat_index.reshape(-1))
        return window_tokens.reshape(B, C, K, D), valid

    def pool_windows(self, window_tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """The second, learnable half of ``forward``: window_tokens (B, C, K, D), valid (B, C, K) -> (B, C, D)."""
        K, D = self.kernel_size * self.kernel_size, self.dim
        if not isinstance(window_tokens, torch.Tensor) or window_tokens.dim() != 4 \
                or tuple(window_tokens.shape[2:]) != (K, D):
            got = tuple(window_tokens.shape) if isinstance(window_tokens, torch.Tensor) else type(window_tokens).__name__
            raise ValueError(f"window_tokens: expected shape (B, C, {K}, {D}), got {got}")
        if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool \
                or tuple(valid.shape) != tuple(window_tokens.shape[:3]):
            got = f"{valid.dtype} {tuple(valid.shape)}" if isinstance(valid, torch.Tensor) else type(valid).__name__
            raise ValueError(f"valid: expected a bool tensor of shape {tuple(window_tokens.shape[:3])}, got {got}")
        # Masked softmax over the in-grid offsets (the centre is always in the grid, so no row is empty).
        # Softmax in at least float32 (fp16/bf16 logits would round the weights), float64 kept as is.
        logits = self.window_logits.to(torch.promote_types(self.window_logits.dtype, torch.float32))
        logits = logits.masked_fill(~valid, float("-inf"))                        # B, C, K
        weights = logits.softmax(dim=-1).to(window_tokens.dtype)                  # B, C, K
        pooled = torch.einsum("bck,bckd->bcd", weights, window_tokens)            # B, C, D
        return pooled + self.proj(pooled)

    def forward(self, cue_tokens: torch.Tensor, patch_tokens: torch.Tensor) -> torch.Tensor:
        """cue_tokens (B, C, D), patch_tokens (B, H, W, D) -> buddy_tokens (B, C, D)."""
        return self.pool_windows(*self.gather_windows(cue_tokens, patch_tokens))
