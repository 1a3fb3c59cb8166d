"""maxsim_scores and MaxSimLoss against brute-force loop references on Python floats.

The references loop over query sets, document sets, query tokens and document tokens, and build the
hinge loss pair by pair; they share no code with maxsim_loss.py.
"""
import math
from typing import List, Optional

import pytest
import torch

from maxsim_loss import MaxSimLoss, gather_with_grad, maxsim_scores


# ------------------------------------------------------------------------------------------- reference

def _unit(v: List[float]) -> List[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / max(norm, 1e-12) for x in v]


def ref_scores(queries: torch.Tensor, docs: torch.Tensor, query_mask: Optional[torch.Tensor] = None,
               doc_mask: Optional[torch.Tensor] = None, normalize: bool = True,
               reduction: str = "mean") -> torch.Tensor:
    """(Bq, Nq, D) x (Bd, Nd, D) -> (Bq, Bd) float64 MaxSim scores, by four nested loops."""
    q_l, d_l = queries.double().tolist(), docs.double().tolist()
    out = []
    for i, q_set in enumerate(q_l):
        row = []
        for j, d_set in enumerate(d_l):
            total, count = 0.0, 0
            for a, q in enumerate(q_set):
                if query_mask is not None and not bool(query_mask[i, a]):
                    continue
                best = -math.inf
                for b, d in enumerate(d_set):
                    if doc_mask is not None and not bool(doc_mask[j, b]):
                        continue
                    qq, dd = (_unit(q), _unit(d)) if normalize else (q, d)
                    best = max(best, sum(x * y for x, y in zip(qq, dd)))
                total += best
                count += 1
            if reduction == "mean":
                total = total / count if count else 0.0
            row.append(total)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64).reshape(len(q_l), len(d_l))


def ref_triplet_terms(anchor, positive, negative, am=None, pm=None, nm=None, margin=0.1, normalize=True,
                      reduction="mean") -> List[float]:
    """relu(margin - s(a_i, p_i) + s(a_i, n_i)) for every anchor i (one negative each)."""
    terms = []
    for i in range(anchor.shape[0]):
        sl = slice(i, i + 1)
        kw = dict(normalize=normalize, reduction=reduction)
        s_pos = float(ref_scores(anchor[sl], positive[sl], _row(am, i), _row(pm, i), **kw))
        s_neg = float(ref_scores(anchor[sl], negative[sl], _row(am, i), _row(nm, i), **kw))
        terms.append(max(0.0, margin - s_pos + s_neg))
    return terms


def ref_in_batch_terms(anchor, positive, negative, am=None, pm=None, nm=None, margin=0.1, normalize=True,
                       reduction="mean") -> List[float]:
    """For every anchor i: its own positive vs every other positive and every negative (2B - 1 each)."""
    B = anchor.shape[0]
    kw = dict(normalize=normalize, reduction=reduction)
    terms = []
    for i in range(B):
        sl = slice(i, i + 1)
        s_pos = float(ref_scores(anchor[sl], positive[sl], _row(am, i), _row(pm, i), **kw))
        negatives = [(positive, pm, j) for j in range(B) if j != i] + [(negative, nm, j) for j in range(B)]
        assert len(negatives) == 2 * B - 1
        for docs, mask, j in negatives:
            s_neg = float(ref_scores(anchor[sl], docs[j:j + 1], _row(am, i), _row(mask, j), **kw))
            terms.append(max(0.0, margin - s_pos + s_neg))
    return terms


def ref_triplet_loss(*args, **kwargs) -> float:
    terms = ref_triplet_terms(*args, **kwargs)
    return sum(terms) / len(terms)


def ref_in_batch_loss(*args, **kwargs) -> float:
    terms = ref_in_batch_terms(*args, **kwargs)
    return sum(terms) / len(terms)


def _row(mask: Optional[torch.Tensor], i: int) -> Optional[torch.Tensor]:
    return None if mask is None else mask[i:i + 1]


def random_mask(B: int, N: int, g: torch.Generator, p_keep: float = 0.6) -> torch.Tensor:
    mask = torch.rand(B, N, generator=g) < p_keep
    mask[:, 0] = True  # at least one real token per set (fully masked sets get their own tests)
    return mask


def triplets(B=3, Na=4, Np=5, Nn=3, D=8, seed=0, masks=True):
    g = torch.Generator().manual_seed(seed)
    a, p, n = (torch.randn(B, N, D, generator=g) for N in (Na, Np, Nn))
    am, pm, nm = (random_mask(B, N, g) for N in (Na, Np, Nn)) if masks else (None, None, None)
    return a, p, n, am, pm, nm


# -------------------------------------------------------------------------------------- maxsim_scores

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("use_qmask,use_dmask", [(False, False), (True, False), (False, True), (True, True)])
def test_scores_match_loop_reference(normalize, reduction, use_qmask, use_dmask):
    g = torch.Generator().manual_seed(1)
    Bq, Nq, Bd, Nd, D = 3, 4, 5, 6, 8          # Bq != Bd, Nq != Nd
    q, d = torch.randn(Bq, Nq, D, generator=g), torch.randn(Bd, Nd, D, generator=g)
    qm = random_mask(Bq, Nq, g) if use_qmask else None
    dm = random_mask(Bd, Nd, g) if use_dmask else None
    got = maxsim_scores(q, d, qm, dm, normalize=normalize, reduction=reduction)
    assert got.shape == (Bq, Bd) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_scores(q, d, qm, dm, normalize, reduction),
                               rtol=1e-5, atol=1e-5)


def test_mean_scores_of_cosines_lie_in_unit_interval_and_self_score_is_one():
    g = torch.Generator().manual_seed(2)
    x = 10 * torch.randn(4, 6, 16, generator=g)
    s = maxsim_scores(x, x)
    assert (s.abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(s.diagonal(), torch.ones(4))


def test_masked_doc_token_never_wins_even_with_negative_similarities():
    # Every real doc token is anti-aligned with the query token, so every real similarity is negative.
    # The padded doc token is zero (what padding usually is) in doc 0, and a perfect match in doc 1.
    q = torch.tensor([[[1.0, 0.0, 0.0]]])                                            # 1, 1, 3
    docs = torch.tensor([[[-1.0, 0.5, 0.0], [-1.0, -0.2, 0.3], [0.0, 0.0, 0.0]],
                         [[-1.0, 0.5, 0.0], [-1.0, -0.2, 0.3], [1.0, 0.0, 0.0]]])    # 2, 3, 3
    dm = torch.tensor([[True, True, False], [True, True, False]])
    want = ref_scores(q, docs, None, dm)
    assert (want < 0).all()
    got = maxsim_scores(q, docs, doc_mask=dm)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert (got < 0).all()
    # The flawed alternative (multiply similarities by the mask, as some peers do) gives 0 and 0: the
    # test above tells the two apart.
    qn, dn = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(docs, dim=-1)
    zero_masked = (torch.einsum("qnd,bmd->qbnm", qn, dn) * dm[None, :, None, :]).amax(-1).mean(-1)
    assert torch.equal(zero_masked, torch.zeros(1, 2))
    for reduction in ("sum", "mean"):
        assert not torch.allclose(maxsim_scores(q, docs, doc_mask=dm, reduction=reduction), zero_masked)


def test_fully_masked_query_scores_zero_and_fully_masked_doc_scores_minus_inf():
    g = torch.Generator().manual_seed(3)
    q, d = torch.randn(2, 3, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    qm = torch.tensor([[False, False, False], [True, False, True]])
    for reduction in ("mean", "sum"):
        s = maxsim_scores(q, d, qm, reduction=reduction)
        assert torch.equal(s[0], torch.zeros(3))
        torch.testing.assert_close(s.double(), ref_scores(q, d, qm, reduction=reduction))
    dm = torch.tensor([[True, True], [False, False], [True, False]])
    s = maxsim_scores(q, d, qm, dm)
    assert torch.equal(s[0], torch.zeros(3))                       # no query token: 0, even against -inf
    assert s[1, 1] == -math.inf
    assert torch.isfinite(s[1, [0, 2]]).all()


@pytest.mark.parametrize("max_block_elements", [1, 60, 130, 200])
def test_chunked_path_equals_unchunked(max_block_elements):
    # Bq * Nq * Nd = 3 * 4 * 5 = 60 elements per document: 1 and 60 -> one doc per chunk, 130 -> two
    # per chunk with a remainder (7 docs), 200 -> three per chunk.
    g = torch.Generator().manual_seed(4)
    q = torch.randn(3, 4, 8, generator=g, requires_grad=True)
    d = torch.randn(7, 5, 8, generator=g, requires_grad=True)
    qm, dm = random_mask(3, 4, g), random_mask(7, 5, g)
    upstream = torch.randn(3, 7, generator=g)
    whole = maxsim_scores(q, d, qm, dm)
    chunked = maxsim_scores(q, d, qm, dm, max_block_elements=max_block_elements)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked.double(), ref_scores(q, d, qm, dm), rtol=1e-5, atol=1e-5)
    grads_whole = torch.autograd.grad((whole * upstream).sum(), [q, d])
    grads_chunked = torch.autograd.grad((chunked * upstream).sum(), [q, d])
    for a, b in zip(grads_chunked, grads_whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_chunking_really_splits_the_documents(monkeypatch):
    import maxsim_loss
    calls = []
    real = maxsim_loss._maxsim_block

    def spy(queries, docs, doc_mask):
        calls.append(docs.shape[0])
        return real(queries, docs, doc_mask)

    monkeypatch.setattr(maxsim_loss, "_maxsim_block", spy)
    maxsim_scores(torch.randn(3, 4, 8), torch.randn(7, 5, 8), max_block_elements=130)
    assert calls == [2, 2, 2, 1]
    calls.clear()
    maxsim_scores(torch.randn(3, 4, 8), torch.randn(7, 5, 8))
    assert calls == [7]


def test_mixed_dtypes_are_promoted():
    g = torch.Generator().manual_seed(5)
    q, d = torch.randn(2, 3, 8, generator=g), torch.randn(4, 5, 8, generator=g).half()
    s = maxsim_scores(q, d)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, maxsim_scores(q, d.float()), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.double(), ref_scores(q, d), rtol=1e-5, atol=1e-5)
    # the loss without in-batch negatives (a separate code path) accepts the same mix
    a, p, n = torch.randn(2, 3, 8), torch.randn(2, 3, 8).half(), torch.randn(2, 3, 8).bfloat16()
    for in_batch, ref in ((False, ref_triplet_loss), (True, ref_in_batch_loss)):
        got = MaxSimLoss(margin=0.5, in_batch_negatives=in_batch)(a, p, n)
        assert got.dtype == torch.float32
        assert math.isclose(float(got), ref(a, p, n, margin=0.5), rel_tol=1e-5, abs_tol=1e-5)


def test_empty_batches_give_empty_score_matrices():
    # Decision: Bq=0 or Bd=0 is valid and returns an empty (Bq, Bd) matrix ...
    assert maxsim_scores(torch.randn(0, 3, 4), torch.randn(2, 5, 4)).shape == (0, 2)
    assert maxsim_scores(torch.randn(2, 3, 4), torch.randn(0, 5, 4)).shape == (2, 0)
    # ... but a set of zero tokens is an error (it used to give NaN, or an IndexError from amax);
    # variable token counts are what masks are for.
    with pytest.raises(ValueError, match="queries"):
        maxsim_scores(torch.randn(2, 0, 4), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="docs"):
        maxsim_scores(torch.randn(2, 3, 4), torch.randn(2, 0, 4))
    with pytest.raises(ValueError, match="negative"):
        MaxSimLoss(in_batch_negatives=False)(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 0, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_padding_tokens_give_finite_gradients_in_every_dtype(dtype):
    # Padding is usually zeros. Normalising a zero vector must not produce 0/0 = NaN: the masked
    # similarity hides it in the forward pass, but 0 * NaN poisons every gradient in the backward.
    # (With F.normalize's default eps=1e-12, which is 0 in float16, it did.)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 3, 8, generator=g).to(dtype).requires_grad_(True)
    d = torch.randn(3, 4, 8, generator=g)
    d[:, 2:] = 0
    d = d.to(dtype).requires_grad_(True)
    dm = torch.tensor([[True, True, False, False]] * 3)
    s = maxsim_scores(q, d, doc_mask=dm)
    assert torch.isfinite(s).all()
    s.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(d.grad).all()
    assert (d.grad[:, 2:] == 0).all()
    torch.testing.assert_close(s.double(), ref_scores(q.float(), d.float(), None, dm), rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------- MaxSimLoss

# Margins that leave some hinges active and some not, for each score scale (checked in the tests).
SETTINGS = [("mean", True, 0.3), ("sum", True, 0.5), ("mean", False, 1.0)]


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("reduction,normalize,margin", SETTINGS)
def test_triplet_loss_without_in_batch_negatives_matches_hand_formula(masks, reduction, normalize, margin):
    a, p, n, am, pm, nm = triplets(B=6, masks=masks)
    loss_fn = MaxSimLoss(margin=margin, in_batch_negatives=False, reduction=reduction, normalize=normalize)
    got = loss_fn(a, p, n, am, pm, nm)
    assert got.dim() == 0
    terms = ref_triplet_terms(a, p, n, am, pm, nm, margin=margin, normalize=normalize, reduction=reduction)
    assert len(terms) == 6
    assert any(t > 0 for t in terms) and any(t == 0 for t in terms)  # both sides of the hinge are used
    assert math.isclose(float(got), sum(terms) / len(terms), rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("reduction,normalize,margin", SETTINGS)
def test_in_batch_loss_matches_loop_over_every_other_document(masks, reduction, normalize, margin):
    a, p, n, am, pm, nm = triplets(B=4, masks=masks)         # 4, 5 and 3 tokens: padding in the concat
    loss_fn = MaxSimLoss(margin=margin, in_batch_negatives=True, reduction=reduction, normalize=normalize)
    got = loss_fn(a, p, n, am, pm, nm)
    terms = ref_in_batch_terms(a, p, n, am, pm, nm, margin=margin, normalize=normalize, reduction=reduction)
    assert len(terms) == 4 * (2 * 4 - 1)
    assert any(t > 0 for t in terms) and any(t == 0 for t in terms)
    want = sum(terms) / len(terms)
    assert math.isclose(float(got), want, rel_tol=1e-5, abs_tol=1e-5)
    # ... and it is not the plain triplet loss
    assert not math.isclose(want, ref_triplet_loss(a, p, n, am, pm, nm, margin=margin, normalize=normalize,
                                                   reduction=reduction), rel_tol=1e-3)


def test_only_some_masks_given_with_different_token_counts():
    a, p, n, am, pm, nm = triplets(B=3, Na=4, Np=6, Nn=2)
    for kwargs in (dict(positive_mask=pm), dict(negative_mask=nm), dict(anchor_mask=am, negative_mask=nm)):
        for in_batch, ref in ((True, ref_in_batch_loss), (False, ref_triplet_loss)):
            got = MaxSimLoss(margin=0.5, in_batch_negatives=in_batch)(a, p, n, **kwargs)
            want = ref(a, p, n, kwargs.get("anchor_mask"), kwargs.get("positive_mask"),
                       kwargs.get("negative_mask"), margin=0.5)
            assert math.isclose(float(got), want, rel_tol=1e-5, abs_tol=1e-5), (kwargs, in_batch)


def test_scores_method_uses_the_loss_settings():
    a, p, _, am, pm, _ = triplets()
    loss_fn = MaxSimLoss(reduction="sum", normalize=False)
    torch.testing.assert_close(loss_fn.scores(a, p, am, pm).double(),
                               ref_scores(a, p, am, pm, normalize=False, reduction="sum"))


@pytest.mark.parametrize("in_batch", [False, True])
def test_gradients_flow_to_all_inputs_and_match_finite_differences(in_batch):
    # A large margin keeps every hinge active, so every input matters; float64 for gradcheck.
    a, p, n, am, pm, nm = (t.double() if t.is_floating_point() else t for t in triplets(B=2, D=4))
    a, p, n = (t.requires_grad_(True) for t in (a, p, n))
    loss_fn = MaxSimLoss(margin=5.0, in_batch_negatives=in_batch)
    loss_fn(a, p, n, am, pm, nm).backward()
    for t, m in ((a, am), (p, pm), (n, nm)):
        assert t.grad is not None and torch.isfinite(t.grad).all()
        assert (t.grad[m].abs().sum(-1) > 0).any()                 # real tokens get gradient
        assert (t.grad[~m] == 0).all()                             # padded tokens get none
    assert torch.autograd.gradcheck(lambda x, y, z: loss_fn(x, y, z, am, pm, nm), (a, p, n))


def test_torch_compile_fullgraph_matches_eager():
    # fullgraph=True fails on any graph break (data-dependent Python branching, .item(), ...). On CPU
    # the "aot_eager" backend traces like inductor (forward and backward) without inductor's slow C++
    # code generation; the CUDA test compiles with the default inductor backend.
    a, p, n, am, pm, nm = triplets(B=3)
    loss_fn = MaxSimLoss(margin=0.3)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss_fn):
        inputs = [t.clone().requires_grad_(True) for t in (a, p, n)]
        loss = fn(*inputs, am, pm, nm)
        loss.backward()
        results.append((loss.detach(), [t.grad for t in inputs]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_batch", [False, True])
def test_low_precision_is_close_to_float32(dtype, in_batch):
    a, p, n, am, pm, nm = triplets(B=4, D=16)
    loss_fn = MaxSimLoss(margin=0.3, in_batch_negatives=in_batch)
    want = loss_fn(a, p, n, am, pm, nm)
    low = [t.to(dtype).requires_grad_(True) for t in (a, p, n)]
    got = loss_fn(*low, am, pm, nm)
    assert got.dtype == dtype
    assert math.isclose(float(got.detach()), float(want), abs_tol=3e-2)
    got.backward()
    assert all(torch.isfinite(t.grad).all() for t in low)


def test_autocast_bfloat16_on_cpu():
    a, p, n, am, pm, nm = triplets(B=4, D=16)
    loss_fn = MaxSimLoss(margin=0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(a, p, n, am, pm, nm)
    assert math.isclose(float(got), float(loss_fn(a, p, n, am, pm, nm)), abs_tol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_without_host_syncs():
    a, p, n, am, pm, nm = triplets(B=4, D=16)
    want = {ib: MaxSimLoss(margin=0.3, in_batch_negatives=ib)(a, p, n, am, pm, nm) for ib in (False, True)}
    cuda = [t.cuda() for t in (a, p, n, am, pm, nm)]
    for t in cuda[:3]:
        t.requires_grad_(True)
    q, d = cuda[0].detach(), torch.randn(7, 5, 16, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = {ib: MaxSimLoss(margin=0.3, in_batch_negatives=ib)(*cuda) for ib in (False, True)}
        got[True].backward()
        chunked = maxsim_scores(q, d, max_block_elements=100)
        whole = maxsim_scores(q, d)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    compiled = torch.compile(MaxSimLoss(margin=0.3), fullgraph=True)    # default backend: inductor
    assert math.isclose(float(compiled(*cuda)), float(want[True]), rel_tol=1e-4, abs_tol=1e-5)
    for ib in (False, True):
        assert math.isclose(float(got[ib]), float(want[ib]), rel_tol=1e-4, abs_tol=1e-5)
    torch.testing.assert_close(chunked, whole)
    assert all(torch.isfinite(t.grad).all() for t in cuda[:3])


# ------------------------------------------------------------------------------------- distributed

def test_gather_with_grad_without_distributed_is_identity():
    import torch.distributed as dist
    if dist.is_available():
        assert not dist.is_initialized()
    x = torch.randn(3, 4, 5, requires_grad=True)
    gathered, offset = gather_with_grad(x)
    assert gathered is x and offset == 0
    mask = torch.rand(3, 4) > 0.5
    gathered, offset = gather_with_grad(mask)
    assert gathered is mask and offset == 0


@pytest.mark.parametrize("masks", [False, True])
def test_gather_distributed_single_process_equals_local(masks):
    a, p, n, am, pm, nm = triplets(B=3, masks=masks)
    grads = []
    losses = []
    for gather in (False, True):
        inputs = [t.clone().requires_grad_(True) for t in (a, p, n)]
        loss = MaxSimLoss(margin=0.3, gather_distributed=gather)(*inputs, am, pm, nm)
        loss.backward()
        losses.append(loss)
        grads.append([t.grad for t in inputs])
    assert torch.equal(losses[0], losses[1])
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)


# ----------------------------------------------------------------------------------------- bad input

def test_bad_inputs_to_maxsim_scores():
    q, d = torch.randn(2, 3, 4), torch.randn(5, 6, 4)
    with pytest.raises(ValueError, match="queries"):
        maxsim_scores(torch.randn(3, 4), d)
    with pytest.raises(ValueError, match="docs"):
        maxsim_scores(q, torch.randn(5, 6, 4, 1))
    with pytest.raises(ValueError, match="docs.*dim 4"):
        maxsim_scores(q, torch.randn(5, 6, 3))
    with pytest.raises(TypeError, match="queries"):
        maxsim_scores(q.long(), d)
    with pytest.raises(TypeError, match="docs"):
        maxsim_scores(q, d.tolist())
    with pytest.raises(TypeError, match="query_mask"):
        maxsim_scores(q, d, query_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match="doc_mask.*\\(5, 6\\)"):
        maxsim_scores(q, d, doc_mask=torch.ones(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="reduction"):
        maxsim_scores(q, d, reduction="max")
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_block_elements"):
            maxsim_scores(q, d, max_block_elements=bad)


def test_bad_inputs_to_the_loss():
    a, p, n, am, pm, nm = triplets(B=3)
    loss_fn = MaxSimLoss()
    with pytest.raises(ValueError, match="positive/negative.*batch 3"):
        loss_fn(a, p[:2], n)
    with pytest.raises(ValueError, match="positive/negative.*batch 3"):
        loss_fn(a, p, n[:1])
    with pytest.raises(ValueError, match="anchor"):
        loss_fn(a[:0], p[:0], n[:0])
    with pytest.raises(ValueError, match="anchor"):
        loss_fn(a[0], p, n)
    with pytest.raises(TypeError, match="negative"):
        loss_fn(a, p, n.int())
    with pytest.raises(TypeError, match="positive_mask"):
        loss_fn(a, p, n, positive_mask=pm.float())
    with pytest.raises(TypeError, match="anchor_mask"):
        loss_fn(a, p, n, anchor_mask=am.tolist())
    with pytest.raises(ValueError, match="negative_mask"):
        loss_fn(a, p, n, negative_mask=pm)                       # the positive's (3, 5) mask
    with pytest.raises(ValueError, match="positive/negative.*dim 8"):
        loss_fn(a, p, n[..., :4])
    for kwargs, name in ((dict(margin=-0.1), "margin"), (dict(margin="0.1"), "margin"),
                         (dict(margin=True), "margin"), (dict(margin=float("nan")), "margin"),
                         (dict(margin=float("inf")), "margin"), (dict(reduction="max"), "reduction")):
        with pytest.raises((ValueError, TypeError), match=name):
            MaxSimLoss(**kwargs)


# ------------------------------------------------------------------------------- false negatives by id

def ref_loss_with_ids(anchor, positive, negative, anchor_ids, negative_ids, margin, in_batch):
    """Loop reference: per anchor, the mean hinge over candidates whose id differs from the anchor's,
    then the mean over anchors (an anchor with no candidate left contributes 0)."""
    B = anchor.shape[0]
    per_anchor = []
    for i in range(B):
        s_pos = float(ref_scores(anchor[i:i + 1], positive[i:i + 1]))
        if in_batch:
            candidates = [(positive, int(anchor_ids[j]), j) for j in range(B) if j != i]
            candidates += [(negative, int(negative_ids[j]), j) for j in range(B)]
        else:
            candidates = [(negative, int(negative_ids[i]), i)]
        terms = [max(0.0, margin - s_pos + float(ref_scores(anchor[i:i + 1], docs[j:j + 1])))
                 for docs, doc_id, j in candidates if doc_id != int(anchor_ids[i])]
        per_anchor.append(sum(terms) / len(terms) if terms else 0.0)
    return sum(per_anchor) / B


@pytest.mark.parametrize("in_batch", [True, False])
def test_ids_leave_out_false_negatives(in_batch):
    a, p, n, *_ = triplets(B=5, Na=4, Np=4, Nn=4, masks=False)
    # Anchors 0 and 3 show the same image (id 7), negative 1 shows anchor 2's image, negative 4 its own
    # anchor's: the reference drops those pairs, so anchors get different numbers of negatives.
    anchor_ids = torch.tensor([7, 1, 2, 7, 4])
    negative_ids = torch.tensor([1, 2, 9, 9, 4])
    loss_fn = MaxSimLoss(margin=0.5, in_batch_negatives=in_batch)
    got = loss_fn(a, p, n, anchor_ids=anchor_ids, negative_ids=negative_ids)
    want = ref_loss_with_ids(a, p, n, anchor_ids, negative_ids, 0.5, in_batch)
    assert math.isclose(float(got), want, rel_tol=1e-5, abs_tol=1e-6)
    # Distinct ids everywhere leave every pair in: the same as giving no ids.
    unique = MaxSimLoss(margin=0.5, in_batch_negatives=in_batch)(
        a, p, n, anchor_ids=torch.arange(5), negative_ids=torch.arange(5, 10))
    torch.testing.assert_close(unique, loss_fn(a, p, n))
    assert not math.isclose(float(got), float(unique), rel_tol=1e-4)


def test_a_copy_of_the_positive_among_the_negatives_is_left_out_only_with_ids():
    a, p, n, *_ = triplets(B=3, Na=4, Np=4, Nn=4, masks=False)
    n = n.clone()
    n[1] = p[0]          # triplet 1's negative is anchor 0's positive image
    loss_fn = MaxSimLoss(margin=0.2)
    with_ids = loss_fn(a, p, n, anchor_ids=torch.tensor([0, 1, 2]), negative_ids=torch.tensor([2, 0, 1]))
    want = ref_loss_with_ids(a, p, n, torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1]), 0.2, True)
    assert math.isclose(float(with_ids), want, rel_tol=1e-5, abs_tol=1e-6)
    # Without ids that copy is a "negative" scoring exactly the positive's score: a hinge of the margin.
    assert float(loss_fn(a, p, n)) > float(with_ids)


def test_bad_ids():
    a, p, n, *_ = triplets(B=3, Na=4, Np=4, Nn=4, masks=False)
    loss_fn = MaxSimLoss()
    with pytest.raises(ValueError, match="anchor_ids/negative_ids"):
        loss_fn(a, p, n, anchor_ids=torch.arange(3))
    with pytest.raises(ValueError, match="negative_ids: expected a \\(3,\\) integer tensor"):
        loss_fn(a, p, n, anchor_ids=torch.arange(3), negative_ids=torch.arange(4))
    with pytest.raises(ValueError, match="anchor_ids: expected a \\(3,\\) integer tensor"):
        loss_fn(a, p, n, anchor_ids=torch.zeros(3), negative_ids=torch.arange(3))
