"""Deterministic, resumable batches: a seeded permutation per epoch, a global position, and
each process's share of every global batch."""

from __future__ import annotations

import numpy as np


class BatchPlan:
    """Which records make up optimiser step ``step``, for one process.

    The global batch of a step is ``batch_size`` consecutive records of an endless stream
    of per-epoch permutations (seeded by ``seed`` and the epoch). Process ``rank`` of
    ``world`` takes every ``world``-th of them, split into ``grad_accum`` micro-batches. The
    position is a pure function of the step, so resuming at step k is exact.
    """

    def __init__(self, n_records: int, batch_size: int, grad_accum: int, seed: int, rank: int = 0, world: int = 1):
        if batch_size % (grad_accum * world):
            from vlsi.errors import ConfigError

            raise ConfigError(
                f"batch_size={batch_size} must be a multiple of grad_accum x processes = {grad_accum} x {world}"
            )
        self.n, self.bs, self.accum, self.seed, self.rank, self.world = n_records, batch_size, grad_accum, seed, rank, world
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def global_batch(self, step: int) -> list[int]:
        start = step * self.bs
        out = []
        for k in range(start, start + self.bs):
            epoch, pos = divmod(k, self.n)
            out.append(int(self._perm(epoch)[pos]))
        return out

    def micro_batches(self, step: int) -> list[list[int]]:
        mine = self.global_batch(step)[self.rank::self.world]
        per = len(mine) // self.accum
        return [mine[i * per:(i + 1) * per] for i in range(self.accum)]
