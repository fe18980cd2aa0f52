# SPDX-FileCopyrightText: Copyright (c) 2026 kvpress fork contributors
# SPDX-License-Identifier: Apache-2.0
"""RKVLSHPress: R-KV with SimHash redundancy (R-KV: https://arxiv.org/abs/2505.24133; SimHash, Charikar 2002).

The one idea: R-KV's redundancy needs the cosine similarity of every pair of cached keys (quadratic in the cache).
SimHash gives each key an `n_hash_bits` code from the signs of random projections; two keys whose codes differ in h
bits have an angle of about `pi * h / n_hash_bits`, so similarities are estimated per pair of buckets, and the
redundancy costs O(C * 2**n_hash_bits) instead of O(C**2). The reasoning fork's variant
(https://arxiv.org/abs/2512.12008), with a seeded projection so runs are reproducible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from kvpress.presses.rkv_press import RKVPress
from kvpress.validation import validate_int

logger = logging.getLogger(__name__)

MAX_HASH_BITS = 12


def simhash_codes(keys: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """SimHash code `(B, H_kv, C)` of each key `(B, H_kv, C, d)`: bit j is set when the key has a positive dot
    product with column j of `projection` `(d, n_bits)`."""
    bits = (keys.float() @ projection.float()) > 0
    weights = 2 ** torch.arange(projection.shape[1], device=keys.device)
    return (bits.long() * weights).sum(dim=-1)


def hamming_cosine_table(n_bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`(2**n_bits, 2**n_bits)` estimated cosine similarity between two codes: `cos(pi * hamming / n_bits)`."""
    codes = torch.arange(2**n_bits, device=device)
    differing = codes[:, None] ^ codes[None, :]
    hamming = sum(((differing >> bit) & 1) for bit in range(n_bits))
    return torch.cos(math.pi * hamming.float() / n_bits)


def lsh_redundancy(codes: torch.Tensor, table: torch.Tensor, threshold: float) -> torch.Tensor:
    """R-KV's redundancy `(B, H_kv, C)` with similarities estimated from SimHash `codes` `(B, H_kv, C)`.

    Equal to `redundancy_from_similarity(table[codes_i, codes_j], threshold)`, computed per bucket: the column sums
    come from the bucket counts, and the most recent similar neighbour of each token from the most recent member of
    every similar bucket (the second most recent in its own bucket when it is the most recent itself).
    """
    bsz, num_kv_heads, n_candidates = codes.shape
    n_buckets = table.shape[0]
    table = table.to(codes.device).float()
    counts = torch.zeros(bsz, num_kv_heads, n_buckets, device=codes.device)
    counts.scatter_add_(-1, codes, torch.ones_like(codes, dtype=counts.dtype))
    # sum_i table[code_i, code_j] over every i (j included), minus j itself (table[c, c] = 1)
    column_sums = (counts @ table).gather(-1, codes) - table.diagonal()[codes]

    positions = torch.arange(n_candidates, device=codes.device).expand_as(codes)
    latest = torch.full((bsz, num_kv_heads, n_buckets), -1, dtype=torch.long, device=codes.device)
    latest = latest.scatter_reduce(-1, codes, positions, reduce="amax")
    is_latest = latest.gather(-1, codes) == positions
    second = torch.full_like(latest, -1).scatter_reduce(-1, codes, torch.where(is_latest, -1, positions), reduce="amax")
    # most recent other member of each token's own bucket
    own = torch.where(is_latest, second.gather(-1, codes), latest.gather(-1, codes))
    own = torch.where(table.diagonal()[codes] > threshold, own, -1)
    # most recent member of the other buckets that are similar enough to the token's bucket
    similar_buckets = (table > threshold) & ~torch.eye(n_buckets, dtype=torch.bool, device=codes.device)
    others = torch.where(similar_buckets[codes], latest.unsqueeze(2), -1).amax(dim=-1)
    neighbour = torch.maximum(own, others)
    has_neighbour = neighbour >= 0
    neighbour_codes = codes.gather(-1, neighbour.clamp(min=0))
    exempt = table[codes, neighbour_codes] * has_neighbour
    column_sums = column_sums.scatter_add(-1, neighbour.clamp(min=0), -exempt)
    return (column_sums / n_candidates).softmax(dim=-1)


@dataclass
class RKVLSHPress(RKVPress):
    """R-KV whose key redundancy is estimated with SimHash (`n_hash_bits` random hyperplanes) instead of exact
    cosine similarities; everything else (importance, window, `compress_interval`, budget) is RKVPress's.

    The projection is drawn from a generator seeded with `seed` (the same hyperplanes for every call, layer and run;
    `seed=None` draws fresh hyperplanes from torch's global generator at every call, as the fork did).
    """

    n_hash_bits: int = 6
    seed: Optional[int] = 0

    def __post_init__(self):
        meaning = "hash bits; 2**n_hash_bits buckets"
        validate_int(self, "n_hash_bits", self.n_hash_bits, 1, meaning, maximum=MAX_HASH_BITS)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"RKVLSHPress.seed must be an integer or None, got {self.seed!r}.")
        super().__post_init__()

    def projection(self, head_dim: int, device: torch.device) -> torch.Tensor:
        """The `(head_dim, n_hash_bits)` Gaussian hyperplanes (the same ones for a given seed)."""
        if self.seed is None:
            return torch.randn(head_dim, self.n_hash_bits, device=device)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(head_dim, self.n_hash_bits, generator=generator).to(device)

    def hash_codes(self, keys: torch.Tensor) -> torch.Tensor:
        """SimHash codes `(B, H_kv, C)` of the keys `(B, H_kv, C, d)`."""
        return simhash_codes(keys, self.projection(keys.shape[-1], keys.device))

    def candidate_redundancy(self, keys: torch.Tensor, n_candidates: int) -> torch.Tensor:
        """The fork's LSH redundancy of the candidates among themselves (hashes stand in for the similarities)."""
        return self.redundancy(keys[:, :, :n_candidates])

    def redundancy(self, keys: torch.Tensor) -> torch.Tensor:
        table = hamming_cosine_table(self.n_hash_bits, keys.device)
        return lsh_redundancy(self.hash_codes(keys), table, self.similarity_threshold)
