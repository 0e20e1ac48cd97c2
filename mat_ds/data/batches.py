"""Deterministic order and (micro-)batches of ``mat_ds.data``: stream positions, epoch permutations, MLM masking.

Batches are a pure function of (seed, stream position): ``global_positions`` lays the infinite training stream out over
(step, micro_step, rank) so that 1 rank x grad_accum 2 sees exactly the samples of 2 ranks x grad_accum 1;
``block_indices`` maps positions to blocks with one seeded permutation per epoch; ``make_batch`` builds CLM or MLM
batches whose MLM mask depends only on (seed, position). Resuming at a step therefore replays the same data.
``eval_batch_count`` / ``iter_eval_batches`` give the fixed evaluation batches of each rank.
"""
from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING, Iterator, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .tokenizer import Tokenizer

# Salts that keep the random streams of permutation and masking independent.
_PERM_SALT = 0x5045524D  # "PERM"
_MASK_SALT = 0x4D41534B  # "MASK"

IGNORE_INDEX = -100


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (hash-mixed, so nearby inputs give unrelated streams)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(int(p).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def global_positions(step: int, micro_step: int, rank: int, world_size: int, micro_batch: int,
                     grad_accum: int) -> torch.Tensor:
    """Stream positions of one micro-batch: ``base = step*GB + (micro_step*world_size + rank)*micro_batch``, with
    ``GB = micro_batch*world_size*grad_accum``; returns ``arange(base, base + micro_batch)``. One optimizer step covers
    ``[step*GB, (step+1)*GB)`` whatever the split between ranks and accumulation steps."""
    if not (world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if not (grad_accum >= 1 and 0 <= micro_step < grad_accum):
        raise ValueError(f"micro_step={micro_step} must be in [0, grad_accum={grad_accum})")
    if micro_batch < 1 or step < 0:
        raise ValueError(f"micro_batch={micro_batch} must be >= 1 and step={step} >= 0")
    global_batch = micro_batch * world_size * grad_accum
    base = step * global_batch + (micro_step * world_size + rank) * micro_batch
    return torch.arange(base, base + micro_batch, dtype=torch.long)


@functools.lru_cache(maxsize=8)  # a few (n_blocks, seed, epoch): bounded memory for big corpora
def _epoch_permutation(n_blocks: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(_derive_seed(_PERM_SALT, seed, epoch))
    return torch.randperm(n_blocks, generator=g)


def block_indices(positions: torch.Tensor, n_blocks: int, seed: int) -> torch.Tensor:
    """Block index of each stream position: ``perm(seed, epoch)[pos % n_blocks]`` with ``epoch = pos // n_blocks`` and
    one seeded ``torch.randperm`` per epoch (cached). Same result on every rank and after a resume."""
    if n_blocks < 1:
        raise ValueError(f"n_blocks={n_blocks} must be >= 1")
    pos = torch.as_tensor(positions, dtype=torch.long)
    if pos.numel() and int(pos.min()) < 0:
        raise ValueError("stream positions must be >= 0")
    epochs = pos // n_blocks
    offsets = pos % n_blocks
    out = torch.empty_like(pos)
    for epoch in torch.unique(epochs).tolist():
        sel = epochs == epoch
        out[sel] = _epoch_permutation(n_blocks, seed, int(epoch))[offsets[sel]]
    return out


def _mlm_mask(x: torch.Tensor, positions: torch.Tensor, tokenizer: Tokenizer, mlm_probability: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``x`` [B, L]; the random draws of row i come from a generator seeded by (seed, positions[i])."""
    B, L = x.shape
    u_sel = torch.empty(B, L)
    u_act = torch.empty(B, L)
    r_tok = torch.empty(B, L, dtype=torch.long)
    n_normal = len(tokenizer.normal_ids)
    for i, pos in enumerate(positions.tolist()):
        g = torch.Generator().manual_seed(_derive_seed(_MASK_SALT, seed, pos))
        u_sel[i] = torch.rand(L, generator=g)
        u_act[i] = torch.rand(L, generator=g)
        r_tok[i] = torch.randint(n_normal, (L,), generator=g)
    eligible = x != tokenizer.pad_id
    selected = (u_sel < mlm_probability) & eligible
    # at least one selected position per sample (unless it is all padding): the eligible one with the smallest draw
    empty = ~selected.any(dim=1) & eligible.any(dim=1)
    if empty.any():
        first = torch.where(eligible, u_sel, torch.full_like(u_sel, 2.0)).argmin(dim=1)
        rows = empty.nonzero().squeeze(1)
        selected[rows, first[rows]] = True
    labels = torch.where(selected, x, torch.full_like(x, IGNORE_INDEX))
    inputs = x.clone()
    to_mask = selected & (u_act < 0.8)
    to_rand = selected & (u_act >= 0.8) & (u_act < 0.9)
    inputs[to_mask] = tokenizer.mask_id
    inputs[to_rand] = tokenizer.normal_ids[r_tok[to_rand]]
    return inputs, labels


def make_batch(blocks: torch.Tensor, positions: torch.Tensor, *, objective: str, tokenizer: Tokenizer,
               mlm_probability: float, seed: int, n_blocks_for_order: Optional[int] = None,
               shuffle: bool = True) -> dict[str, torch.Tensor]:
    """The micro-batch for stream ``positions``: ``{'input_ids', 'labels'}``, LongTensors [len(positions), seq_len].

    Rows: ``shuffle=True`` -> ``block_indices(positions, n_blocks_for_order or len(blocks), seed)`` (an order computed
    over the first ``n_blocks_for_order`` blocks only, which must be <= len(blocks)); ``shuffle=False`` ->
    ``positions % len(blocks)`` (eval, probe set).
    ``objective='clm'``: labels = input_ids (the model shifts). ``'mlm'``: each non-pad token is selected with
    probability ``mlm_probability`` (at least one per sample); selected tokens become ``<mask>`` (80%), a random
    non-special token (10%) or stay (10%); labels = original id where selected, -100 elsewhere. The mask of a sample
    depends only on (seed, its position) -> identical on any rank layout and after a resume.
    """
    if blocks.dim() != 2 or len(blocks) == 0:
        raise ValueError(f"blocks must be a non-empty [N, seq_len] tensor, got shape {tuple(blocks.shape)}")
    pos = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    if pos.numel() and int(pos.min()) < 0:
        raise ValueError("stream positions must be >= 0")
    if shuffle:
        n_order = len(blocks) if n_blocks_for_order is None else int(n_blocks_for_order)
        if not 1 <= n_order <= len(blocks):
            raise ValueError(f"n_blocks_for_order={n_blocks_for_order} must be in [1, {len(blocks)}]")
        idx = block_indices(pos, n_order, seed)
    else:
        idx = pos % len(blocks)
    x = blocks[idx].long()
    if objective == "clm":
        return {"input_ids": x, "labels": x.clone()}
    if objective == "mlm":
        if not 0 < mlm_probability < 1:
            raise ValueError(f"mlm_probability={mlm_probability} must be in (0, 1)")
        inputs, labels = _mlm_mask(x, pos, tokenizer, mlm_probability, seed)
        return {"input_ids": inputs, "labels": labels}
    raise ValueError(f"objective={objective!r} is not 'clm' or 'mlm'")


def eval_batch_count(n_blocks: int, micro_batch: int, world_size: int, max_batches: int) -> int:
    """Batches per rank in one evaluation pass: the SAME on every rank (ZeRO-3 gathers parameters collectively, so
    ranks must run the same number of forwards). Full batches only; at least one (wrapping round a tiny set)."""
    count = max(1, n_blocks // (micro_batch * world_size))
    return min(count, max_batches) if max_batches > 0 else count


def iter_eval_batches(blocks: torch.Tensor, micro_batch: int, rank: int, world_size: int, max_batches: int,
                      objective: str, tokenizer: Tokenizer, mlm_probability: float,
                      seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Evaluation batches of ``rank``: batch k holds positions ``(k*world_size + rank)*mb + [0, mb)`` (mod
    ``len(blocks)``), so within a pass no block is seen twice unless the set is smaller than one global batch.
    ``shuffle=False`` and masks seeded by (seed, position): every evaluation sees the same inputs and masks."""
    if micro_batch < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need micro_batch >= 1 and 0 <= rank < world_size, got {micro_batch}, {rank}, {world_size}")
    n = len(blocks)
    for k in range(eval_batch_count(n, micro_batch, world_size, max_batches)):
        start = (k * world_size + rank) * micro_batch
        yield make_batch(blocks, torch.arange(start, start + micro_batch) % n, objective=objective,
                         tokenizer=tokenizer, mlm_probability=mlm_probability, seed=seed, shuffle=False)
