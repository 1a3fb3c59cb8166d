"""BuddyPool and nearest_patch against a brute-force reference written with plain Python loops.

The reference works on Python floats (per image, per cue, per window cell; cosine as dot / norms) and
shares no code with buddy_pool.py. Inputs are built so that the nearest patch is unambiguous (or an
exact tie), which keeps the float32-vs-float64 comparison deterministic.
"""
import math
from typing import List, Optional, Tuple

import pytest
import torch

from buddy_pool import BuddyPool, nearest_patch

EPS = 1e-6  # the norm floor of nearest_patch


# ------------------------------------------------------------------------------------------- reference

def ref_cosine(a: List[float], b: List[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    norm_a = math.sqrt(sum(x * x for x in a))
    norm_b = math.sqrt(sum(y * y for y in b))
    return dot / (max(norm_a, EPS) * max(norm_b, EPS))


def ref_nearest(cue: torch.Tensor, patches: torch.Tensor) -> List[List[Tuple[int, int]]]:
    """(B, C, D), (B, H, W, D) -> per image, per cue, the (row, col) of the most cosine-similar patch.

    Strict '>' while scanning rows then columns: the first cell in row-major order wins a tie.
    """
    cue_l, patch_l = cue.double().tolist(), patches.double().tolist()
    out = []
    for b in range(len(cue_l)):
        per_cue = []
        for c in range(len(cue_l[b])):
            best, best_cell = -math.inf, None
            for row in range(len(patch_l[b])):
                for col in range(len(patch_l[b][row])):
                    s = ref_cosine(cue_l[b][c], patch_l[b][row][col])
                    if s > best:
                        best, best_cell = s, (row, col)
            per_cue.append(best_cell)
        out.append(per_cue)
    return out


def assert_clear_winner(cue: torch.Tensor, patches: torch.Tensor, margin: float = 1e-3) -> None:
    """The best cosine beats the runner-up by `margin`, so float32 rounding cannot change the argmax."""
    cue_l, patch_l = cue.double().tolist(), patches.double().tolist()
    for b in range(len(cue_l)):
        for c in range(len(cue_l[b])):
            sims = sorted((ref_cosine(cue_l[b][c], p) for row in patch_l[b] for p in row), reverse=True)
            assert len(sims) == 1 or sims[0] - sims[1] > margin, "test construction: near tie"


def ref_window_cells(centre: Tuple[int, int], H: int, W: int, k: int) -> List[Tuple[int, int, int]]:
    """In-grid cells of the k x k window around centre, as (row, col, offset index in row-major k x k)."""
    r = k // 2
    cells = []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            row, col = centre[0] + dy, centre[1] + dx
            if 0 <= row < H and 0 <= col < W:
                cells.append((row, col, (dy + r) * k + (dx + r)))
    return cells


def ref_buddy(cue: torch.Tensor, patches: torch.Tensor, k: int, logits: Optional[List[float]] = None,
              weight: Optional[List[List[float]]] = None, bias: Optional[List[float]] = None) -> torch.Tensor:
    """Reference Buddy tokens (B, C, D) in float64.

    logits=None: plain mean over the in-grid window cells (BuddyPool at init). Otherwise softmax of the
    logits of the in-grid offsets, and, if weight/bias are given, the residual pooled + W @ pooled + b.
    """
    B, H, W, D = patches.shape
    patch_l = patches.double().tolist()
    centres = ref_nearest(cue, patches)
    out = []
    for b in range(B):
        per_cue = []
        for centre in centres[b]:
            cells = ref_window_cells(centre, H, W, k)
            if logits is None:
                weights = [1.0 / len(cells)] * len(cells)
            else:
                top = max(logits[i] for _, _, i in cells)
                exps = [math.exp(logits[i] - top) for _, _, i in cells]
                weights = [e / sum(exps) for e in exps]
            pooled = [0.0] * D
            for w, (row, col, _) in zip(weights, cells):
                for d in range(D):
                    pooled[d] += w * patch_l[b][row][col][d]
            if weight is not None:
                pooled = [pooled[i] + sum(weight[i][j] * pooled[j] for j in range(D)) + bias[i]
                          for i in range(D)]
            per_cue.append(pooled)
        out.append(per_cue)
    return torch.tensor(out, dtype=torch.float64).reshape(B, len(centres[0]) if B else 0, D)


def forced_inputs(targets: List[List[Tuple[int, int]]], H: int, W: int, D: int = 8,
                  noise: float = 0.05, generator: Optional[torch.Generator] = None):
    """Random patches, and cues that each point (up to small noise) at the given target cell.

    Returns cue (B, C, D), patches (B, H, W, D). Asserts that the target wins by a clear cosine margin.
    """
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    B, C = len(targets), len(targets[0])
    patches = torch.randn(B, H, W, D, generator=g)
    cue = torch.empty(B, C, D)
    for b in range(B):
        for c, (row, col) in enumerate(targets[b]):
            scale = 0.5 + 2 * torch.rand((), generator=g)  # cosine ignores the scale
            cue[b, c] = scale * (patches[b, row, col] + noise * torch.randn(D, generator=g))
    assert ref_nearest(cue, patches) == targets, "test construction: the target is not the nearest patch"
    assert_clear_winner(cue, patches)
    return cue, patches


def cells_of(index: torch.Tensor, W: int) -> List[List[Tuple[int, int]]]:
    return [[(int(i) // W, int(i) % W) for i in row] for row in index]


def randomise(pool: BuddyPool, seed: int = 1) -> None:
    """Move the learnable parameters away from their identity initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        pool.window_logits.copy_(torch.randn(pool.window_logits.shape, generator=g))
        pool.proj.weight.copy_(0.3 * torch.randn(pool.proj.weight.shape, generator=g))
        pool.proj.bias.copy_(0.3 * torch.randn(pool.proj.bias.shape, generator=g))


def ref_learned(pool: BuddyPool, cue: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    return ref_buddy(cue, patches, pool.kernel_size, logits=pool.window_logits.double().tolist(),
                     weight=pool.proj.weight.double().tolist(), bias=pool.proj.bias.double().tolist())


# ------------------------------------------------------------------------------ reference self-checks

def test_reference_window_counts_by_hand():
    # The reference itself, on cases simple enough to count: 3x3 window in a 4x5 grid.
    assert len(ref_window_cells((0, 0), 4, 5, 3)) == 4       # corner
    assert len(ref_window_cells((0, 2), 4, 5, 3)) == 6       # top edge
    assert len(ref_window_cells((2, 2), 4, 5, 3)) == 9       # interior
    assert len(ref_window_cells((3, 4), 4, 5, 3)) == 4       # opposite corner
    assert len(ref_window_cells((0, 0), 1, 1, 5)) == 1       # 1x1 grid
    assert len(ref_window_cells((1, 1), 2, 3, 5)) == 6       # window larger than the grid: the whole grid


# --------------------------------------------------------------------------- nearest patch, every cell

@pytest.mark.parametrize("H,W", [(1, 1), (4, 4), (3, 7), (7, 2), (1, 5), (5, 1)])
def test_nearest_patch_every_cell(H, W):
    # One cue per grid cell, each forced to its cell: covers every border, corner and interior position.
    # Two images with the cells in opposite orders so that the batch dimension is exercised too.
    cells = [(r, c) for r in range(H) for c in range(W)]
    cue, patches = forced_inputs([cells, cells[::-1]], H, W)
    index = nearest_patch(cue, patches)
    assert index.shape == (2, H * W) and index.dtype == torch.int64
    assert cells_of(index, W) == ref_nearest(cue, patches)
    assert torch.equal(BuddyPool(8).nearest_patch(cue, patches), index)


def test_nearest_patch_random_inputs_match_reference():
    # Unforced random inputs; the ranking margin is checked so that float32 rounding cannot flip it.
    g = torch.Generator().manual_seed(3)
    cue, patches = torch.randn(3, 6, 16, generator=g), torch.randn(3, 5, 4, 16, generator=g)
    assert_clear_winner(cue, patches)
    assert cells_of(nearest_patch(cue, patches), 4) == ref_nearest(cue, patches)


def test_nearest_patch_ties_go_to_first_in_row_major_order():
    # Small integers and a cue of norm 2 make every dot product and norm exact in float32, so duplicated
    # patches tie exactly whatever order the matmul sums in.
    g = torch.Generator().manual_seed(4)
    H, W, D = 4, 5, 8
    patches = torch.randint(-3, 4, (2, H, W, D), generator=g).float()
    target = torch.tensor([1.0, 1.0, 1.0, 1.0, 0, 0, 0, 0])          # norm 2
    # image 0: duplicates at (1, 3), (2, 0), (3, 4): the first in row-major order is (1, 3)
    # image 1: duplicates at (0, 4) and (0, 1) and (3, 0): the first is (0, 1), although written last
    for row, col in [(3, 4), (2, 0), (1, 3)]:
        patches[0, row, col] = target
    for row, col in [(3, 0), (0, 4), (0, 1)]:
        patches[1, row, col] = 3 * target  # same direction, different scale: still an exact cosine tie
    cue = torch.stack([2 * target, target]).unsqueeze(0).expand(2, 2, D).contiguous()
    expected = [[(1, 3), (1, 3)], [(0, 1), (0, 1)]]
    assert ref_nearest(cue, patches) == expected
    assert cells_of(nearest_patch(cue, patches), W) == expected
    # ... and the Buddy token is pooled around that first cell
    out = BuddyPool(D)(cue, patches)
    torch.testing.assert_close(out.double(), ref_buddy(cue, patches, 3), rtol=1e-5, atol=1e-5)


def test_nearest_patch_all_equal_and_zero_tokens():
    # Everything ties: index 0. A zero cue has cosine 0 with everything: index 0, and no NaN anywhere.
    patches = torch.ones(1, 3, 3, 4)
    assert nearest_patch(torch.randn(1, 2, 4).abs(), patches).tolist() == [[0, 0]]
    zero_cue = torch.zeros(1, 1, 4)
    assert nearest_patch(zero_cue, torch.randn(1, 3, 3, 4)).tolist() == [[0]]
    out = BuddyPool(4)(zero_cue, torch.zeros(1, 2, 2, 4))
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- Buddy tokens at init

@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("H,W", [(1, 1), (4, 4), (3, 7), (7, 2), (2, 3)])
def test_buddy_at_init_is_plain_window_mean_everywhere(k, H, W):
    # Every cell as a centre (so every border/corner clipping case), for every kernel size, including
    # windows larger than the grid (k=5 on 2x3 and 1x1).
    cells = [(r, c) for r in range(H) for c in range(W)]
    cue, patches = forced_inputs([cells, cells[::-1]], H, W)
    out = BuddyPool(8, kernel_size=k)(cue, patches)
    assert out.shape == cue.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_buddy(cue, patches, k), rtol=1e-5, atol=1e-5)


def test_k1_is_the_nearest_patch_itself():
    cells = [(r, c) for r in range(3) for c in range(4)]
    cue, patches = forced_inputs([cells], 3, 4)
    out = BuddyPool(8, kernel_size=1)(cue, patches)
    expected = torch.stack([patches[0, r, c] for r, c in cells]).unsqueeze(0)
    assert torch.equal(out, expected)


def test_corner_window_k3_averages_exactly_four_patches_by_hand():
    # 3x3 grid, D=2; the cue (1, 0) points at the top-left patch (5, 0): every other patch has a clearly
    # positive second component.
    patches = torch.tensor([[[5., 0.], [2., 4.], [9., 9.]],
                            [[3., 8.], [6., 2.], [9., 9.]],
                            [[9., 9.], [9., 9.], [9., 9.]]]).unsqueeze(0)            # 1, 3, 3, 2
    cue = torch.tensor([[[1., 0.]]])
    assert nearest_patch(cue, patches).tolist() == [[0]]
    # By hand: (5, 0) + (2, 4) + (3, 8) + (6, 2) = (16, 14), over 4 patches (not 9, not clamped repeats)
    out = BuddyPool(2, kernel_size=3)(cue, patches)
    torch.testing.assert_close(out, torch.tensor([[[4.0, 3.5]]]), rtol=0, atol=1e-6)


def test_opposite_corner_of_non_square_grid_by_hand():
    # 3x4 grid; the cue (1, -4) points at the bottom-right patch (1, -4), the only one with a negative
    # second component.
    patches = torch.tensor([[[1., 1.], [2., 1.], [3., 1.], [4., 1.]],
                            [[1., 2.], [2., 2.], [3., 2.], [4., 3.]],
                            [[1., 3.], [2., 3.], [7., 5.], [1., -4.]]]).unsqueeze(0)  # 1, 3, 4, 2
    cue = torch.tensor([[[1., -4.]]])
    assert nearest_patch(cue, patches).tolist() == [[11]]
    # By hand: (3, 2) + (4, 3) + (7, 5) + (1, -4) = (15, 6) -> (3.75, 1.5)
    out = BuddyPool(2, kernel_size=3)(cue, patches)
    torch.testing.assert_close(out, torch.tensor([[[3.75, 1.5]]]), rtol=0, atol=1e-6)


def test_window_indices_and_mask():
    pool = BuddyPool(4, kernel_size=3)
    centre = torch.tensor([[0, 2, 6, 11]])                 # in a 3x4 grid: (0,0), (0,2), (1,2), (2,3)
    index, valid = pool.window(centre, (3, 4))
    assert index.shape == valid.shape == (1, 4, 9)
    assert valid.sum(-1).tolist() == [[4, 6, 9, 4]]
    for c, (row, col) in enumerate([(0, 0), (0, 2), (1, 2), (2, 3)]):
        cells = ref_window_cells((row, col), 3, 4, 3)
        assert [i for i in range(9) if valid[0, c, i]] == [k for _, _, k in cells]
        assert [int(index[0, c, k]) for _, _, k in cells] == [r * 4 + cc for r, cc, _ in cells]
        assert ((index >= 0) & (index < 12)).all()


# --------------------------------------------------------------------------------- learnable parameters

@pytest.mark.parametrize("k,H,W", [(3, 4, 5), (5, 3, 7), (3, 1, 1), (5, 2, 3)])
def test_learned_parameters_follow_masked_softmax_and_residual(k, H, W):
    cells = [(r, c) for r in range(H) for c in range(W)]
    cue, patches = forced_inputs([cells, cells[::-1]], H, W)
    pool = BuddyPool(8, kernel_size=k)
    randomise(pool)
    out = pool(cue, patches)
    torch.testing.assert_close(out.double(), ref_learned(pool, cue, patches), rtol=1e-5, atol=1e-5)


def test_window_logits_alone_and_proj_alone():
    cells = [(r, c) for r in range(3) for c in range(4)]
    cue, patches = forced_inputs([cells], 3, 4)
    pool = BuddyPool(8)
    with torch.no_grad():
        pool.window_logits.copy_(torch.linspace(-2, 2, 9))
    torch.testing.assert_close(pool(cue, patches).double(),
                               ref_buddy(cue, patches, 3, logits=pool.window_logits.double().tolist()),
                               rtol=1e-5, atol=1e-5)
    # A large centre logit turns the pooling into "take the centre patch".
    with torch.no_grad():
        pool.window_logits.zero_()
        pool.window_logits[4] = 50.0
    torch.testing.assert_close(pool(cue, patches), ref_buddy(cue, patches, 1).float(), rtol=1e-5, atol=1e-5)
    # Zero logits (plain mean) and a non-zero projection: mean + W @ mean + b.
    randomise(pool)
    with torch.no_grad():
        pool.window_logits.zero_()
    want = ref_buddy(cue, patches, 3, weight=pool.proj.weight.double().tolist(),
                     bias=pool.proj.bias.double().tolist())
    torch.testing.assert_close(pool(cue, patches).double(), want, rtol=1e-5, atol=1e-5)


def test_gradients_reach_parameters_and_patches_not_the_argmax():
    cells = [(r, c) for r in range(3) for c in range(4)]
    cue, patches = forced_inputs([cells, cells[::-1]], 3, 4)
    cue.requires_grad_(True)
    patches.requires_grad_(True)
    pool = BuddyPool(8)
    randomise(pool)
    upstream = torch.randn(cue.shape, generator=torch.Generator().manual_seed(9))
    (pool(cue, patches) * upstream).sum().backward()

    # Independent expectation: the same formula built from torch ops cue by cue (centres from the
    # reference), differentiated by autograd.
    logits = pool.window_logits.detach().clone().requires_grad_(True)
    weight = pool.proj.weight.detach().clone().requires_grad_(True)
    bias = pool.proj.bias.detach().clone().requires_grad_(True)
    patches2 = patches.detach().clone().requires_grad_(True)
    loss = 0.0
    for b, per_cue in enumerate(ref_nearest(cue, patches)):
        for c, centre in enumerate(per_cue):
            cells_k = ref_window_cells(centre, 3, 4, 3)
            w = torch.softmax(torch.stack([logits[i] for _, _, i in cells_k]), dim=0)
            pooled = sum(w[n] * patches2[b, row, col] for n, (row, col, _) in enumerate(cells_k))
            loss = loss + ((pooled + weight @ pooled + bias) * upstream[b, c]).sum()
    loss.backward()

    for got, want in [(pool.window_logits.grad, logits.grad), (pool.proj.weight.grad, weight.grad),
                      (pool.proj.bias.grad, bias.grad), (patches.grad, patches2.grad)]:
        assert got is not None and got.abs().sum() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # The argmax carries no gradient: the cues do not get one.
    assert cue.grad is None


def test_gradients_reach_parameters_at_init():
    # Training starts from the identity initialisation: gradients must not vanish there.
    cue, patches = forced_inputs([[(1, 1), (0, 0)]], 3, 3)
    pool = BuddyPool(8)
    (pool(cue, patches) * torch.randn(1, 2, 8)).sum().backward()
    for p in (pool.window_logits, pool.proj.weight, pool.proj.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_out_of_grid_offsets_get_no_weight_and_no_gradient():
    # Only a top-left corner cue: offsets with dy = -1 or dx = -1 (indices 0, 1, 2, 3, 6) fall outside.
    cue, patches = forced_inputs([[(0, 0)]], 3, 3)
    pool = BuddyPool(8)
    with torch.no_grad():
        pool.window_logits.copy_(torch.arange(9.0))     # large logits on offsets that do not exist here
    out = pool(cue, patches)
    (out * torch.randn(out.shape)).sum().backward()
    outside, inside = [0, 1, 2, 3, 6], [4, 5, 7, 8]
    assert (pool.window_logits.grad[outside] == 0).all()
    assert (pool.window_logits.grad[inside] != 0).all()
    torch.testing.assert_close(out.double(), ref_buddy(cue, patches, 3, logits=list(range(9))),
                               rtol=1e-5, atol=1e-5)


def test_frozen_tokens_still_train_the_parameters():
    # The usual case: backbone tokens without grad; the loss must still reach BuddyPool's parameters.
    cue, patches = forced_inputs([[(0, 1)]], 2, 3)
    pool = BuddyPool(8)
    out = pool(cue, patches)
    assert out.requires_grad
    grads = torch.autograd.grad((out * torch.randn(out.shape)).sum(),
                                [pool.window_logits, pool.proj.weight, pool.proj.bias])
    assert all(g.abs().sum() > 0 for g in grads)


# ------------------------------------------------------------------------------ dtypes, compile, CUDA

def _dtype_case():
    cells = [(r, c) for r in range(3) for c in range(5)]
    cue, patches = forced_inputs([cells, cells[::-1]], 3, 5, D=16, noise=0.02)
    pool = BuddyPool(16, kernel_size=3)
    randomise(pool)
    return pool, cue, patches


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_dtypes_agree_with_float32(dtype, tol):
    pool, cue, patches = _dtype_case()
    expected = pool(cue, patches)
    low = BuddyPool(16, kernel_size=3)
    low.load_state_dict(pool.state_dict())
    low.to(dtype)
    cue_l, patches_l = cue.to(dtype), patches.to(dtype)
    assert torch.equal(nearest_patch(cue_l, patches_l), nearest_patch(cue, patches))
    out = low(cue_l, patches_l)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    # gradients in low precision are finite
    patches_l.requires_grad_(True)
    low(cue_l, patches_l).sum().backward()
    assert torch.isfinite(patches_l.grad).all() and torch.isfinite(low.window_logits.grad).all()


def test_autocast_bfloat16_on_cpu_agrees_with_float32():
    pool, cue, patches = _dtype_case()
    expected = pool(cue, patches)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(cue, patches)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def test_torch_compile_fullgraph_matches_eager():
    # fullgraph=True fails on any graph break (data-dependent Python branching, .item(), a Python loop
    # over data). On CPU the "aot_eager" backend is used: dynamo and AOT autograd trace exactly as for
    # inductor, but inductor's C++ code generation costs ~25 s (gcc, cold cache) on 2 busy cores. The
    # CUDA test below compiles with the default inductor backend.
    pool, cue, patches = _dtype_case()
    compiled = torch.compile(pool, fullgraph=True, backend="aot_eager")
    patches.requires_grad_(True)
    out = compiled(cue, patches)
    torch.testing.assert_close(out, pool(cue, patches), rtol=1e-5, atol=1e-5)
    grad_compiled = torch.autograd.grad(out.sum(), [patches, pool.window_logits])
    grad_eager = torch.autograd.grad(pool(cue, patches).sum(), [patches, pool.window_logits])
    for got, want in zip(grad_compiled, grad_eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_syncs():
    pool, cue, patches = _dtype_case()
    expected = pool(cue, patches)
    pool_cuda = BuddyPool(16, kernel_size=3)
    pool_cuda.load_state_dict(pool.state_dict())
    pool_cuda.cuda()
    cue_c, patches_c = cue.cuda(), patches.cuda().requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = pool_cuda(cue_c, patches_c)
        index = pool_cuda.nearest_patch(cue_c, patches_c)
        out.sum().backward()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out_bf16 = pool_cuda(cue_c, patches_c)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    compiled = torch.compile(pool_cuda, fullgraph=True)       # the default backend: inductor / Triton
    torch.testing.assert_close(compiled(cue_c, patches_c).cpu(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out_bf16.float().cpu(), expected, rtol=5e-2, atol=5e-2)
    assert torch.equal(index.cpu(), nearest_patch(cue, patches))
    assert torch.isfinite(patches_c.grad).all()


# ------------------------------------------------------------------------------------ vectorisation

def test_empty_batch_and_no_cues_give_empty_outputs():
    # Decision: B=0 and C=0 are valid and return empty (0, C, D) / (B, 0, D) tensors (no special case).
    pool = BuddyPool(8)
    assert pool(torch.randn(0, 3, 8), torch.randn(0, 4, 4, 8)).shape == (0, 3, 8)
    assert nearest_patch(torch.randn(0, 3, 8), torch.randn(0, 4, 4, 8)).shape == (0, 3)
    assert pool(torch.randn(2, 0, 8), torch.randn(2, 4, 4, 8)).shape == (2, 0, 8)


def test_large_batch_equals_per_image_calls():
    g = torch.Generator().manual_seed(5)
    B = 32
    cue, patches = torch.randn(B, 5, 16, generator=g), torch.randn(B, 6, 7, 16, generator=g)
    pool = BuddyPool(16, kernel_size=3)
    randomise(pool)
    batched = pool(cue, patches)
    one_by_one = [pool(cue[i:i + 1], patches[i:i + 1]) for i in range(B)]
    torch.testing.assert_close(batched, torch.cat(one_by_one), rtol=1e-5, atol=1e-6)
    assert torch.equal(nearest_patch(cue, patches),
                       torch.cat([nearest_patch(cue[i:i + 1], patches[i:i + 1]) for i in range(B)]))


def test_traced_graph_size_does_not_depend_on_batch_cues_or_grid():
    # A Python loop over batch, cues or patches would unroll into a graph that grows with them.
    from torch.fx.experimental.proxy_tensor import make_fx
    pool = BuddyPool(8)

    def n_ops(B, C, H, W):
        graph = make_fx(lambda c, p: pool(c, p))(torch.randn(B, C, 8), torch.randn(B, H, W, 8))
        return len(graph.graph.nodes)

    assert n_ops(1, 1, 2, 3) == n_ops(6, 5, 7, 4)


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("cue_shape,patch_shape,name", [
    ((2, 8), (2, 3, 3, 8), "cue_tokens"),            # cue rank 2
    ((2, 1, 3, 8), (2, 3, 3, 8), "cue_tokens"),      # cue rank 4
    ((2, 3, 8), (2, 9, 8), "patch_tokens"),          # flattened patches (rank 3)
    ((2, 3, 8), (3, 3, 3, 8), "patch_tokens"),       # batch mismatch
    ((2, 3, 8), (2, 3, 3, 6), "patch_tokens"),       # dim mismatch
    ((2, 3, 8), (2, 0, 3, 8), "patch_tokens"),       # empty grid
])
def test_bad_shapes_raise_value_error_naming_the_argument(cue_shape, patch_shape, name):
    with pytest.raises(ValueError, match=name):
        BuddyPool(8)(torch.randn(cue_shape), torch.randn(patch_shape))
    with pytest.raises(ValueError, match=name):
        nearest_patch(torch.randn(cue_shape), torch.randn(patch_shape))


def test_dim_not_matching_the_module_raises():
    with pytest.raises(ValueError, match=r"patch_tokens.*dim 8"):
        BuddyPool(8)(torch.randn(2, 3, 6), torch.randn(2, 3, 3, 6))


@pytest.mark.parametrize("kernel_size", [0, 2, 4, -1, True, 3.0, "3", None])
def test_bad_kernel_size(kernel_size):
    with pytest.raises((ValueError, TypeError), match="kernel_size"):
        BuddyPool(8, kernel_size=kernel_size)


@pytest.mark.parametrize("dim", [0, -4, 8.0, True, "8", None])
def test_bad_dim(dim):
    with pytest.raises((ValueError, TypeError), match="dim"):
        BuddyPool(dim)


@pytest.mark.parametrize("which", ["cue", "patch", "both"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_non_float_tensors_raise_type_error(which, dtype):
    cue, patches = torch.randn(2, 3, 8), torch.randn(2, 3, 3, 8)
    if which in ("cue", "both"):
        cue = cue.to(dtype)
    if which in ("patch", "both"):
        patches = patches.to(dtype)
    with pytest.raises(TypeError, match="cue_tokens/patch_tokens"):
        BuddyPool(8)(cue, patches)
    with pytest.raises(TypeError, match="cue_tokens/patch_tokens"):
        nearest_patch(cue, patches)


def test_non_tensors_raise_type_error():
    with pytest.raises(TypeError, match="cue_tokens"):
        BuddyPool(2)([[[0.0, 1.0]]], torch.randn(1, 2, 2, 2))
    with pytest.raises(TypeError, match="patch_tokens"):
        BuddyPool(2)(torch.randn(1, 1, 2), [[[[0.0, 1.0]]]])


# ------------------------------------------------------------------------ the two halves of forward

@pytest.mark.parametrize("k,H,W", [(3, 4, 4), (5, 2, 3), (1, 3, 7)])
def test_gather_windows_then_pool_windows_is_forward(k, H, W):
    torch.manual_seed(3)
    B, C, D = 2, 3, 8
    cue, patches = torch.randn(B, C, D), torch.randn(B, H, W, D)
    pool = BuddyPool(D, kernel_size=k)
    randomise(pool)
    windows, valid = pool.gather_windows(cue, patches)
    assert windows.shape == (B, C, k * k, D) and valid.shape == (B, C, k * k) and valid.dtype == torch.bool
    # Every in-grid cell holds the patch the loop reference names, at its row-major window offset.
    centres = ref_nearest(cue, patches)
    for b in range(B):
        for c in range(C):
            cells = ref_window_cells(centres[b][c], H, W, k)
            assert sorted(o for _, _, o in cells) == valid[b, c].nonzero().flatten().tolist()
            for row, col, offset in cells:
                assert torch.equal(windows[b, c, offset], patches[b, row, col])
    torch.testing.assert_close(pool.pool_windows(windows, valid), pool(cue, patches), rtol=0, atol=0)


def test_pool_windows_trains_on_cached_windows_like_forward():
    """Caching the windows (as the demo does) gives the same parameter gradients as the full forward."""
    torch.manual_seed(4)
    cue, patches = torch.randn(3, 5, 8), torch.randn(3, 4, 4, 8)
    pool = BuddyPool(8)
    randomise(pool)
    pool(cue, patches).square().sum().backward()
    full = [p.grad.clone() for p in pool.parameters()]
    pool.zero_grad()
    with torch.no_grad():
        cached = pool.gather_windows(cue, patches)
    pool.pool_windows(*cached).square().sum().backward()
    for want, p in zip(full, pool.parameters()):
        torch.testing.assert_close(p.grad, want)


def test_pool_windows_bad_inputs():
    pool = BuddyPool(8)
    windows, valid = torch.randn(2, 5, 9, 8), torch.ones(2, 5, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"window_tokens: expected shape \(B, C, 9, 8\)"):
        pool.pool_windows(windows[..., :4], valid)
    with pytest.raises(ValueError, match="valid: expected a bool tensor"):
        pool.pool_windows(windows, valid.float())
    with pytest.raises(ValueError, match="valid: expected a bool tensor"):
        pool.pool_windows(windows, valid[:, :3])
