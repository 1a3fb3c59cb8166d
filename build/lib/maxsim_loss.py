"""Late-interaction (ColBERT-style MaxSim) scoring of multi-vector representations, and a hinge loss.

An image is a set of N token vectors (here 10: 5 cue tokens and their 5 Buddy tokens). The MaxSim score
of a query set against a document set takes, for every query token, its best-matching document token,
then reduces over the query tokens:

    s(q, d) = reduce_i  max_j  <q_i, d_j>          (cosine when normalize=True)

``reduction="mean"`` (the default) keeps scores in [-1, 1], so a hinge margin of 0.1 means the same
thing for any token count; ``"sum"`` is ColBERT's original reduction.

Masks (bool, True = real token) allow variable token counts. Masked document tokens are set to -inf
before the max, so they never win it -- multiplying by zero instead (as some peers do) lets a padded
token win whenever every real similarity is negative. Masked query tokens do not count in the reduction.

``MaxSimLoss`` is the training objective: for (anchor, positive, negative) triplets,
mean(relu(margin - s(a, p) + s(a, n))) over every (anchor, negative) pair. With in-batch negatives
(the default) each anchor also takes every other triplet's positive and negative as negatives (optional
source ids leave out the ones that show the anchor's own image); with ``gather_distributed=True`` those
come from every process of a torch.distributed job.

This file depends on torch only: copy it into any project.
"""
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["maxsim_scores", "MaxSimLoss", "gather_with_grad"]

# Largest (Bq, Bd_chunk, Nq, Nd) similarity block materialised at once (elements). 2**26 float32
# elements is 256 MiB. Below this no chunking happens at all (the usual case: 10-token sets).
MAX_BLOCK_ELEMENTS = 2 ** 26
_REDUCTIONS = ("mean", "sum")


def _check_tokens(name: str, tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        raise ValueError(f"{name}: expected shape (B, N, D), got {tuple(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise ValueError(f"{name}: expected at least one token per set (N >= 1; mask tokens instead), got "
                         f"{tuple(tokens.shape)}")
    if not tokens.is_floating_point():
        raise TypeError(f"{name}: expected a floating point tensor, got {tokens.dtype}")


def _check_mask(name: str, mask: Optional[torch.Tensor], tokens: torch.Tensor) -> None:
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(f"{name}: expected a bool tensor (True = real token), got {got}")
    if tuple(mask.shape) != tuple(tokens.shape[:2]):
        raise ValueError(f"{name}: expected shape {tuple(tokens.shape[:2])}, got {tuple(mask.shape)}")


def _l2_normalize(tokens: torch.Tensor) -> torch.Tensor:
    """Unit vectors along the last dim; the norm floor must be representable in the dtype (1e-12 is 0 in
    float16, which turns an all-zero padding token into 0/0 = NaN and NaN gradients for everything)."""
    return F.normalize(tokens, dim=-1, eps=max(1e-12, torch.finfo(tokens.dtype).tiny))


def _maxsim_block(queries: torch.Tensor, docs: torch.Tensor, doc_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Best doc-token similarity for every query token: (Bq, Nq, D) x (Bd, Nd, D) -> (Bq, Nq, Bd)."""
    Bq, Nq, D = queries.shape
    Bd, Nd, _ = docs.shape
    # One GEMM over all token pairs: (Bq*Nq, D) @ (D, Bd*Nd).
    sim = (queries.reshape(Bq * Nq, D) @ docs.reshape(Bd * Nd, D).t()).view(Bq, Nq, Bd, Nd)
    if doc_mask is not None:
        # In place on a fresh tensor (the matmul's backward does not need its output): no extra copy.
        sim.masked_fill_(~doc_mask.view(1, 1, Bd, Nd), float("-inf"))
    if sim.requires_grad:
        # max(dim)'s backward keeps only the argmax indices (Bq, Nq, Bd); amax's keeps the whole block and
        # builds two more of its size, so chunking would not bound training memory (3.1x less peak here).
        return sim.max(dim=-1).values                                              # Bq, Nq, Bd
    return sim.amax(dim=-1)                                                        # Bq, Nq, Bd; no indices


def maxsim_scores(
        queries: torch.Tensor,
        docs: torch.Tensor,
        query_mask: Optional[torch.Tensor] = None,
        doc_mask: Optional[torch.Tensor] = None,
        normalize: bool = True,
        reduction: str = "mean",
        max_block_elements: int = MAX_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """MaxSim score of every query set against every document set.

    Args:
        queries: (Bq, Nq, D) query token sets.
        docs: (Bd, Nd, D) document token sets.
        query_mask: optional (Bq, Nq) bool, True = real token; masked query tokens do not count.
        doc_mask: optional (Bd, Nd) bool, True = real token; masked doc tokens never win a max.
        normalize: L2-normalise tokens first, so similarities are cosines.
        reduction: "mean" (scores in [-1, 1] when normalised) or "sum" (ColBERT) over query tokens.
        max_block_elements: the (Bq, Bd, Nq, Nd) similarity tensor is computed in chunks of documents
            holding at most this many elements, so large token counts do not exhaust memory.

    Returns:
        (Bq, Bd) scores. A query with no real token scores 0; a document with no real token gives -inf.
    """
    _check_tokens("queries", queries)
    _check_tokens("docs", docs)
    if queries.shape[-1] != docs.shape[-1]:
        raise ValueError(f"docs: expected token dim {queries.shape[-1]} (as queries), got {docs.shape[-1]}")
    _check_mask("query_mask", query_mask, queries)
    _check_mask("doc_mask", doc_mask, docs)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(max_block_elements, bool) or not isinstance(max_block_elements, int) or max_block_elements < 1:
        raise ValueError(f"max_block_elements: expected a positive int, got {max_block_elements!r}")

    if queries.dtype != docs.dtype:
        common = torch.promote_types(queries.dtype, docs.dtype)
        queries, docs = queries.to(common), docs.to(common)
    if normalize:
        queries, docs = _l2_normalize(queries), _l2_normalize(docs)

    Bq, Nq, _ = queries.shape
    Bd, Nd, _ = docs.shape
    docs_per_block = max(1, max_block_elements // max(1, Bq * Nq * Nd))
    if docs_per_block >= Bd:
        best = _maxsim_block(queries, docs, doc_mask)                              # Bq, Nq, Bd
    else:  # chunk over documents; the chunk count depends on shapes only, never on data
        best = torch.cat([
            _maxsim_block(queries, docs[start:start + docs_per_block],
                          None if doc_mask is None else doc_mask[start:start + docs_per_block])
            for start in range(0, Bd, docs_per_block)], dim=-1)

    if query_mask is not None:
        # where() rather than multiply: a -inf from an all-masked doc times 0 would be NaN.
        best = torch.where(query_mask.unsqueeze(-1), best, best.new_zeros(()))
    scores = best.sum(dim=1)                                                       # Bq, Bd
    if reduction == "mean":
        count = Nq if query_mask is None else query_mask.sum(dim=1, keepdim=True).clamp_min(1).to(scores.dtype)
        scores = scores / count
    return scores


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward gives each process the gradient of its own rows, summed
    over every process's loss: a reduce-scatter, done as all_reduce + slice because older gloo builds
    have no reduce-scatter (the extra traffic is negligible for token sets).

    Written out rather than torch.distributed.nn.functional.all_gather, which does the same but is
    deprecated (FutureWarning) and points to a private module instead.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)                                              # W*B, ...

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # never reduce autograd's buffer in place
        dist.all_reduce(grad)                                     # sum over ranks: every loss sees all rows
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]                                         # B, ...


def gather_with_grad(tensor: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """Concatenate ``tensor`` (B, ...) from every process along dim 0, keeping gradients.

    The backward pass hands each process the gradient of *every* process's loss with respect to its own
    rows (summed over processes). Requires the same shape on every rank, and every rank must call it
    (and run backward) alike. Non-float tensors (masks) are gathered without autograd.

    Returns:
        (world_size * B, ...) gathered tensor, and this process's offset (rank * B) into it. When
        torch.distributed is not initialised, or has one process, returns (tensor, 0) unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor, 0
    offset = dist.get_rank() * tensor.shape[0]
    if not tensor.is_floating_point():  # masks and ids: nothing to differentiate; gloo has no bool
        wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
        parts = [torch.empty_like(wire) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, wire.contiguous())
        return torch.cat(parts, dim=0).to(tensor.dtype), offset
    return _AllGatherWithGrad.apply(tensor), offset


class MaxSimLoss(nn.Module):
    """Hinge loss on MaxSim scores of (anchor, positive, negative) token sets.

    loss = mean over anchors i of the mean over i's negatives n of relu(margin - s(a_i, p_i) + s(a_i, n)),

    which is the mean over all (anchor, negative) pairs when every anchor has the same number of negatives
    (always, unless ids leave some out).

    Args:
        margin: hinge margin, in score units (scores lie in [-1, 1] with the default reduction).
        in_batch_negatives: if True (default), anchor i's negatives are its own negative plus every other
            triplet's positive and negative: 2B - 1 negatives instead of 1, for free, since the scores are
            one (B, 2B) matrix. False gives the plain triplet loss with one negative per anchor.
        reduction: how ``maxsim_scores`` reduces over query tokens, "mean" or "sum". (The loss itself is
            always the mean above.)
        normalize: cosine similarities (default) or raw dot products.
        gather_distributed: with in-batch negatives under torch.distributed, take negatives from every
            process (see ``gather_with_grad``). With N processes of B triplets each, the mean of the N
            losses, and the DDP-averaged gradients, equal what one process computes on all N*B triplets.
            A no-op when torch.distributed is not initialised.

    Shapes:
        forward(anchor (B, N, D), positive (B, N, D), negative (B, N, D), optional masks (B, N),
                optional anchor_ids / negative_ids (B,)) -> scalar
    """

    def __init__(self, margin: float = 0.1, in_batch_negatives: bool = True, reduction: str = "mean",
                 normalize: bool = True, gather_distributed: bool = False) -> None:
        super().__init__()
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) \
                or not 0 <= margin < float("inf"):
            raise ValueError(f"margin: expected a finite non-negative number, got {margin!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction: expected one of {_REDUCTIONS}, got {reduction!r}")
        self.margin = float(margin)
        self.in_batch_negatives = bool(in_batch_negatives)
        self.reduction = reduction
        self.normalize = bool(normalize)
        self.gather_distributed = bool(gather_distributed)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, in_batch_negatives={self.in_batch_negatives}, "
                f"reduction={self.reduction!r}, gather_distributed={self.gather_distributed}")

    def scores(self, queries: torch.Tensor, docs: torch.Tensor, query_mask: Optional[torch.Tensor] = None,
               doc_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(Bq, Nq, D) x (Bd, Nd, D) -> (Bq, Bd) MaxSim scores with this loss's settings."""
        return maxsim_scores(queries, docs, query_mask, doc_mask, normalize=self.normalize,
                             reduction=self.reduction)

    def forward(self, anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                anchor_mask: Optional[torch.Tensor] = None, positive_mask: Optional[torch.Tensor] = None,
                negative_mask: Optional[torch.Tensor] = None, anchor_ids: Optional[torch.Tensor] = None,
                negative_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """anchor, positive, negative (B, N*, D) with optional (B, N*) bool masks -> scalar loss.

        anchor_ids, negative_ids: optional (B,) integer ids of the source (e.g. the image) of each anchor
        (and its positive) and of each negative. A candidate negative with the anchor's own id is a false
        negative -- another view of the same image, which is common when images are few and batches large
        -- and is left out of that anchor's mean. Give both or neither.
        """
        for name, t in (("anchor", anchor), ("positive", positive), ("negative", negative)):
            _check_tokens(name, t)
        B = anchor.shape[0]
        if positive.shape[0] != B or negative.shape[0] != B:
            raise ValueError(f"positive/negative: expected batch {B} (as anchor), got "
                             f"{positive.shape[0]} and {negative.shape[0]}")
        if B == 0:
            raise ValueError("anchor: expected at least one triplet, got an empty batch")
        for name, m, t in (("anchor_mask", anchor_mask, anchor), ("positive_mask", positive_mask, positive),
                           ("negative_mask", negative_mask, negative)):
            _check_mask(name, m, t)
        if not (anchor.shape[2] == positive.shape[2] == negative.shape[2]):
            raise ValueError(f"positive/negative: expected token dim {anchor.shape[2]} (as anchor), got "
                             f"{positive.shape[2]} and {negative.shape[2]}")
        if (anchor_ids is None) != (negative_ids is None):
            raise ValueError("anchor_ids/negative_ids: expected both or neither, got only one")
        for name, ids in (("anchor_ids", anchor_ids), ("negative_ids", negative_ids)):
            if ids is not None and (not isinstance(ids, torch.Tensor) or ids.shape != (B,)
                                    or ids.is_floating_point() or ids.is_complex()):
                got = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
                raise ValueError(f"{name}: expected a ({B},) integer tensor, got {got}")

        if not self.in_batch_negatives:
            # Only the B matched pairs are needed: score them directly, O(B) rather than O(B^2).
            pos = self._paired_scores(anchor, positive, anchor_mask, positive_mask)            # B
            neg = self._paired_scores(anchor, negative, anchor_mask, negative_mask)            # B
            hinge = F.relu(self.margin - pos + neg)                                            # B
            if anchor_ids is not None:
                hinge = hinge.masked_fill(negative_ids == anchor_ids, 0.0)
            return hinge.mean()

        docs, doc_mask = _concat_sets(positive, negative, positive_mask, negative_mask)      # 2B, N, D
        offset = 0
        if self.gather_distributed:
            # Rank r contributes rows [r*2B, (r+1)*2B): its positives, then its negatives.
            docs, offset = gather_with_grad(docs)                                             # 2WB, N, D
            if doc_mask is not None:
                doc_mask, _ = gather_with_grad(doc_mask)
        scores = self.scores(anchor, docs, anchor_mask, doc_mask)                            # B, 2WB
        rows = torch.arange(B, device=scores.device)
        cols = torch.arange(scores.shape[1], device=scores.device)
        is_negative = cols.unsqueeze(0) != (offset + rows).unsqueeze(1)                      # B, 2WB
        if anchor_ids is not None:
            doc_ids = torch.cat([anchor_ids, negative_ids])                                   # 2B
            if self.gather_distributed:
                doc_ids, _ = gather_with_grad(doc_ids)                                        # 2WB
            is_negative = is_negative & (doc_ids.unsqueeze(0) != anchor_ids.unsqueeze(1))
        pos = scores.diagonal(offset).unsqueeze(1)                                            # B, 1
        hinge = F.relu(self.margin - pos + scores).masked_fill(~is_negative, 0.0)            # B, 2WB
        # Mean over each anchor's negatives, then over anchors: counts are tensors (no data-dependent
        # shapes, so it compiles), and each rank's loss is the mean over its own anchors, so the mean of
        # the ranks' losses is the single-process loss even when ids leave out different numbers.
        per_anchor = hinge.sum(dim=1) / is_negative.sum(dim=1).clamp_min(1).to(hinge.dtype)  # B
        return per_anchor.mean()

    def _paired_scores(self, queries: torch.Tensor, docs: torch.Tensor, query_mask: Optional[torch.Tensor],
                       doc_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """s(q_i, d_i) for i < B: (B, Nq, D) x (B, Nd, D) -> (B,)."""
        if queries.dtype != docs.dtype:
            common = torch.promote_types(queries.dtype, docs.dtype)
            queries, docs = queries.to(common), docs.to(common)
        if self.normalize:
            queries, docs = _l2_normalize(queries), _l2_normalize(docs)
        sim = torch.bmm(queries, docs.transpose(1, 2))                                         # B, Nq, Nd
        if doc_mask is not None:
            sim = sim.masked_fill(~doc_mask.unsqueeze(1), float("-inf"))
        best = sim.amax(dim=-1)                                                                # B, Nq
        if query_mask is not None:
            best = torch.where(query_mask, best, best.new_zeros(()))
        total = best.sum(dim=1)
        if self.reduction == "sum":
            return total
        count = queries.shape[1] if query_mask is None else query_mask.sum(dim=1).clamp_min(1).to(total.dtype)
        return total / count


def _concat_sets(a: torch.Tensor, b: torch.Tensor, a_mask: Optional[torch.Tensor],
                 b_mask: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Stack two batches of token sets (Ba, Na, D), (Bb, Nb, D) into (Ba + Bb, max(Na, Nb), D) + mask."""
    if a.shape[1] == b.shape[1]:
        mask = None
        if a_mask is not None or b_mask is not None:
            mask = torch.cat([
                a_mask if a_mask is not None else a.new_ones(a.shape[:2], dtype=torch.bool),
                b_mask if b_mask is not None else b.new_ones(b.shape[:2], dtype=torch.bool)])
        return torch.cat([a, b]), mask
    n = max(a.shape[1], b.shape[1])

    def pad(t: torch.Tensor, m: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        m = t.new_ones(t.shape[:2], dtype=torch.bool) if m is None else m
        extra = n - t.shape[1]
        return F.pad(t, (0, 0, 0, extra)), F.pad(m, (0, extra), value=False)

    (a, a_mask), (b, b_mask) = pad(a, a_mask), pad(b, b_mask)
    return torch.cat([a, b]), torch.cat([a_mask, b_mask])
