"""From a model's residual stream to per-token statistics of its internal policies.

``sites`` names the vectors, ``capture`` reads them from a forward pass (hooks, and the
memory-bounded forward), ``unembed`` turns them into logits (the lenses), ``reduce`` turns
logits into entropies and the other statistics, ``logprob`` into log-probabilities with gradients.
"""
