"""Padding-free batching: a step's examples concatenated into rows, without attention or
loss across examples.

The rows of a step are packed first-fit decreasing: examples longest first (ties in step
order), each into the first row it fits, a row holding at most max_seq_len tokens. Rows
are then grouped into micro-batches of micro_batch_size rows, so a micro-batch never
holds more than micro_batch_size x max_seq_len tokens (the shape the memory plan is made
for) and a step takes at most grad_accum forward passes, usually fewer. The packing is a
pure function of the step's examples, so resume from a checkpoint stays exact.

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
    """Indices of examples per row, first-fit decreasing into rows of at most capacity tokens.
    An example longer than capacity gets a row of its own (the snapshot truncates to
    max_seq_len, so that does not happen in training)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        row = next((r for r, space in enumerate(free) if n <= space), None)
        if row is None:
            rows.append([i])
            free.append(capacity - n)
        else:
            rows[row].append(i)
            free[row] -= n
    return rows


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
