"""
plumbing/microbatch.py: --grad_accum K, the step's pairs cut into K micro-batches.

The cut comes only after the pairs are sampled and labelled, so that the self-labels, the
response-term baselines and the mean over pairs are the whole step's: the update is that of one
batch (tested), at the cost of one forward pass without a graph. A micro-batch of pairs idx (m,)
holds their rows in the step's layout, [y1 | y2 | y~ of SELM/XPO] (data.Pairs).
"""
import torch


class MicroBatches:
    """The pairs of one step, in micro-batches: iterate for each one's pair indices idx (m,)."""

    def __init__(self, pairs, k):
        self.pairs, self.B = pairs, len(pairs.route)
        self.idx = torch.arange(self.B).tensor_split(k)  # the pairs of each micro-batch

    def __len__(self):
        return len(self.idx)

    def __iter__(self):
        return iter(self.idx)

    def rows(self, idx):
        """The batch rows of the pairs idx (m,) in the layout [y1 | y2 | y~], each (2m [+ m], T'),
        without the trailing columns that are padding in every one of them."""
        batch, B = self.pairs.batch, self.B
        if len(idx) == B:  # one micro-batch: the whole batch, as it is
            return batch
        rows = torch.cat([idx, B + idx] + ([2 * B + idx] if len(batch[0]) > 2 * B else []))
        ids, attention, response = (t[rows.to(t.device)] for t in batch)
        width = int(attention.bool().any(0).nonzero().max()) + 1
        return ids[:, :width], attention[:, :width], response[:, :width]

    def gather(self, values):
        """Per-row values of the micro-batches, each (2m [+ m],), back in the step's layout (2B,)."""
        out = torch.empty(2 * self.B, device=values[0].device)
        for idx, v in zip(self.idx, values):
            out[idx], out[self.B + idx] = v[:len(idx)], v[len(idx):2 * len(idx)]
        return out
