"""Padding-free batching: a step's examples concatenated into rows, without attention or
loss across examples.

The rows of a step are as few as hold its tokens at max_seq_len per row, and as even as
possible: examples longest first (ties in step order), each into the row with the fewest
tokens so far (more rows only when an example would overflow one). Rows of a micro-batch
are padded to the longest, so even rows waste the least: a step of 8 examples of ~100
tokens is two rows of ~400, not one of 512 and one of 290. Rows, fullest first, are then
grouped into micro-batches of micro_batch_size rows, so a micro-batch never holds more
than micro_batch_size x max_seq_len tokens (the shape the memory plan is made for) and a
step takes at most grad_accum forward passes, usually fewer. Attention stays bounded by
max_seq_len per row, where flattening a whole micro-batch into one row would make the CPU's
attention quadratic in all its tokens. The packing is a pure function of the step's
examples, so resume from a checkpoint stays exact.

Inside a row each example keeps its own `position_ids` (0, 1, ... restarting per example)
and its label at its first position is IGNORE: `summed_loss` shifts labels by one, so the
logit at the last token of one example would otherwise be trained to predict the first
token of the next. The rows of a micro-batch are right-padded to the longest; the padding
is a sequence of its own (positions restarting at 0, labels IGNORE), so it attends only
to itself and carries no loss.

No attention crosses examples because of how transformers 4.57 builds the mask
(`masking_utils._preprocess_mask_arguments` and `find_packed_sequence_indices`): when
the model is called with `position_ids`, `attention_mask=None` and no cache
(`past_key_values` None, which for Llama / Qwen2 needs `use_cache=False`: with the
config's default `use_cache=True` the model creates a DynamicCache even in training), it
starts a new sequence wherever a position id is not the previous one plus 1, and ANDs a
block-diagonal mask into the causal mask (torch >= 2.6). That holds for the SDPA and
eager attention implementations. With an all-ones attention mask, or with a cache, the
same call silently lets packed examples attend to each other: tests/worker_gpu/test_packing.py
checks both ways. Flash-attention's varlen kernels (cu_seqlens from the same position_ids)
are the GPU route; no GPU was available where this was written, so that path is not tested here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from activities.dataset_render import IGNORE


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of examples per row: the fewest rows of at most capacity tokens, filled evenly
    (longest example first, into the emptiest row), fullest row first. An example longer than
    capacity gets a row of its own (the snapshot truncates to max_seq_len, so that does not
    happen in training)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    count = max(1, -(-sum(lengths) // capacity))
    while True:
        rows: list[list[int]] = [[] for _ in range(count)]
        fill = [0] * count
        for i in order:
            r = min(range(count), key=lambda r: (fill[r], r))
            if fill[r] and fill[r] + lengths[i] > capacity:
                break  # even the emptiest row cannot take it: one row more
            rows[r].append(i)
            fill[r] += lengths[i]
        else:
            kept = [r for r in range(count) if rows[r]]
            return [rows[r] for r in sorted(kept, key=lambda r: (-fill[r], r))]
        count += 1


def packed_micro_batches(
    examples: Sequence[dict], micro_batch_size: int, max_seq_len: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The step's examples as padding-free micro-batches: input_ids, labels and position_ids
    of shape (rows, width), at most micro_batch_size rows of at most max_seq_len tokens."""
    rows = pack_rows([len(e["input_ids"]) for e in examples], max_seq_len)
    return [
        collate_packed([[examples[i] for i in row] for row in rows[k : k + micro_batch_size]], device)
        for k in range(0, len(rows), micro_batch_size)
    ]


def collate_packed(rows: Sequence[Sequence[dict]], device: torch.device) -> dict[str, torch.Tensor]:
    """Concatenate each row's examples; right-pad the rows to the longest as a sequence of their own."""
    width = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e["input_ids"])
            ids[r, at : at + n] = torch.tensor(e["input_ids"])
            labels[r, at + 1 : at + n] = torch.tensor(e["labels"][1:])  # the first stays IGNORE
            positions[r, at : at + n] = torch.arange(n)
            at += n
        positions[r, at:] = torch.arange(width - at)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": positions.to(device)}
