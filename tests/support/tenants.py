"""Tenants of the fused-pass tests: adapters that differ in rank, rows per micro-batch,
sequence lengths, accumulation window and dropout, with their micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tenant:
    name: str
    r: int
    rows: int
    gas: int
    dropout: float
    seed: int

    def batch(self, step: int) -> list[dict[str, list[int]]]:
        """Micro-batch ``step``: rows of different lengths (8 to 40 tokens), labels on the tail."""
        gen = torch.Generator().manual_seed(self.seed * 1000 + step)
        out = []
        for _ in range(self.rows):
            n = int(torch.randint(8, 41, (1,), generator=gen))
            ids = torch.randint(3, 250, (n,), generator=gen).tolist()
            cut = int(torch.randint(1, n // 2, (1,), generator=gen))
            out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
        return out


def tenants(n: int) -> list[Tenant]:
    ranks, rows, windows = [2, 4, 8, 4, 2, 8, 4, 2], [1, 2, 3, 2, 1, 3, 1, 2], [1, 2, 3, 1, 2, 3, 2, 1]
    return [Tenant(f"t{i}", ranks[i], rows[i], windows[i], 0.1 if i % 2 == 0 else 0.0, 11 + i) for i in range(n)]
