"""A step's model inputs: persistent staging buffers on the host and their twins on the device.

Every step writes its flattened batch (token ids, positions, KV slots, query start offsets, context
lengths, block tables, the rows to sample) into the same pinned host tensors and copies what it wrote
into the same device tensors with non-blocking copies: a step allocates nothing and never waits for a
copy. The CUDA graphs are captured over these device tensors, so eager and graph steps share this one
preparation, padding included. Block-table rows are updated incrementally: a request that keeps its row
only writes the blocks it gained. On CPU host and device tensors are the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scheduling import Chunk


@dataclass
class BatchLayout:
    """What the host knows of the batch just written: enough to describe it to attention."""
    num_tokens: int
    num_seqs: int  # real rows; rows up to `num_rows` are padding
    num_rows: int
    num_decodes: int  # the leading rows with one new token each
    query_lens: list[int]
    seq_lens: list[int]
    num_sampled: int  # rows whose last token is sampled, in `sample_index`


class InputBuffers:
    def __init__(self, max_tokens: int, max_seqs: int, max_blocks_per_seq: int, block_size: int,
                 scratch_block: int, device: torch.device):
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.block_size, self.scratch_block = block_size, scratch_block
        self.on_cuda = device.type == "cuda"

        def pair(shape, dtype, fill):
            host = torch.full(shape, fill, dtype=dtype, pin_memory=self.on_cuda)
            return host, (host.to(device) if self.on_cuda else host)

        scratch_slot = scratch_block * block_size
        self.ids, self.ids_dev = pair((max_tokens,), torch.int64, 0)
        self.positions, self.positions_dev = pair((max_tokens,), torch.int64, 0)
        self.slots, self.slots_dev = pair((max_tokens,), torch.int64, scratch_slot)
        self.qsl, self.qsl_dev = pair((max_seqs + 1,), torch.int32, 0)
        self.seq_lens, self.seq_lens_dev = pair((max_seqs,), torch.int32, 1)
        # Full-width rows: a constant row stride (no kernel respecialisation) and every entry, stale or
        # not, a valid block id (a kernel that over-reads a row reads some block, never out of bounds).
        self.tables, self.tables_dev = pair((max_seqs, max_blocks_per_seq), torch.int32, scratch_block)
        self.sample_index, self.sample_index_dev = pair((max_seqs,), torch.int64, 0)
        # numpy views of the host tensors: list writes and index arithmetic without torch's per-call cost.
        self._np = {name: getattr(self, name).numpy()
                    for name in ("ids", "positions", "slots", "qsl", "seq_lens", "tables", "sample_index")}
        # The block list each table row was last written from, and how much of it: a request's list only
        # grows while it runs (the KV manager replaces the list when it frees or re-admits the request).
        self._row_blocks: list[list[int] | None] = [None] * max_seqs
        self._row_len = [0] * max_seqs
        self._uploaded = torch.cuda.Event() if self.on_cuda else None

    def write(self, chunks: list[Chunk], num_rows: int, sampled_rows: list[int]) -> BatchLayout:
        """Write the chunks' inputs (decodes first), padded to `num_rows` one-token rows that write into
        and attend to the scratch block, and start copying them to the device."""
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the previous step's copies have read the host buffers
        n = self._np
        num_seqs = len(chunks)
        query_lens = [c.num_tokens for c in chunks]
        starts = [c.start for c in chunks]
        seq_lens = [s + q for s, q in zip(starts, query_lens)]
        num_tokens = sum(query_lens)
        num_decodes = next((i for i, q in enumerate(query_lens) if q != 1), num_seqs)
        if num_tokens == num_seqs:
            n["ids"][:num_tokens] = [c.request.token_ids[c.start] for c in chunks]
        else:
            flat: list[int] = []
            for c in chunks:
                flat += c.request.token_ids[c.start:c.start + c.num_tokens]
            n["ids"][:num_tokens] = flat
        qsl = n["qsl"]
        qsl[0] = 0
        np.cumsum(query_lens, out=qsl[1:num_seqs + 1])
        n["seq_lens"][:num_seqs] = seq_lens
        self._write_tables(chunks)
        row = np.repeat(np.arange(num_seqs), query_lens)
        pos = np.arange(num_tokens) - qsl[row] + np.asarray(starts, dtype=np.int64)[row]
        n["positions"][:num_tokens] = pos
        bs = self.block_size
        n["slots"][:num_tokens] = n["tables"][row, pos // bs].astype(np.int64) * bs + pos % bs
        n["sample_index"][:len(sampled_rows)] = qsl[1:][sampled_rows] - 1
        num_sent = num_tokens
        if num_rows > num_seqs:
            self._pad(num_seqs, num_rows)
            num_sent = num_rows  # a padded batch is all decodes: one token per row
        self._upload(num_sent, num_rows, len(sampled_rows))
        return BatchLayout(num_tokens, num_seqs, num_rows, num_decodes, query_lens, seq_lens, len(sampled_rows))

    def _write_tables(self, chunks: list[Chunk]) -> None:
        table = self._np["tables"]
        for i, c in enumerate(chunks):
            blocks = c.request.block_ids
            have = self._row_len[i] if self._row_blocks[i] is blocks else 0
            if have and (have > len(blocks) or table[i, have - 1] != blocks[have - 1]):
                have = 0  # the list was changed in place, not only appended to: write the row afresh
            if have < len(blocks):
                table[i, have:len(blocks)] = blocks[have:]
            self._row_blocks[i], self._row_len[i] = blocks, len(blocks)

    def _pad(self, start: int, stop: int) -> None:
        """Rows [start, stop) become padding: token 0 at position 0, written into the scratch block, one
        token of context read from it."""
        n = self._np
        n["ids"][start:stop] = 0
        n["positions"][start:stop] = 0
        n["slots"][start:stop] = self.scratch_block * self.block_size
        n["seq_lens"][start:stop] = 1
        n["qsl"][start + 1:stop + 1] = np.arange(start + 1, stop + 1)
        n["tables"][start:stop, 0] = self.scratch_block
        self._row_blocks[start:stop] = [None] * (stop - start)

    def _upload(self, num_tokens: int, num_rows: int, num_sampled: int) -> None:
        if not self.on_cuda:
            return
        for name, count in (("ids", num_tokens), ("positions", num_tokens), ("slots", num_tokens),
                            ("qsl", num_rows + 1), ("seq_lens", num_rows), ("sample_index", num_sampled)):
            getattr(self, name + "_dev")[:count].copy_(getattr(self, name)[:count], non_blocking=True)
        # Whole rows: a contiguous copy stays asynchronous (a column slice would go through a pageable
        # temporary); entries past a row's own blocks are stale but never read.
        self.tables_dev[:num_rows].copy_(self.tables[:num_rows], non_blocking=True)
        self._uploaded.record()

    def step_tensors(self, layout: BatchLayout) -> list[torch.Tensor]:
        """The device tensors a written step occupies (block-table rows whole): what tensor-parallel ranks
        copy from rank 0."""
        t, r = max(layout.num_tokens, layout.num_rows), layout.num_rows
        return [self.ids_dev[:t], self.positions_dev[:t], self.slots_dev[:t], self.qsl_dev[:r + 1],
                self.seq_lens_dev[:r], self.tables_dev[:r], self.sample_index_dev[:layout.num_sampled]]

    def pad_all(self) -> None:
        """Every row padding, on host and device: the state CUDA graphs are captured in."""
        self._pad(0, self.max_seqs)
        self._upload(self.max_seqs, self.max_seqs, 0)
        if self.on_cuda:
            self._uploaded.synchronize()
