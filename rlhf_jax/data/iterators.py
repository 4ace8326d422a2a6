"""Resumable, multi-process-aware batch iterators over in-memory numpy arrays.

The trainer checkpoints `get_state()` next to the model, so after a restore the next batch is
exactly the first one the interrupted run had not yet trained on.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """Permutation of range(n) for one epoch: a fresh stream per (seed, epoch), like fold_in."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class ArrayIterator:
    """Infinite (or `num_epochs`-long) iterator of batches from a dict of equal-length arrays.

    `batch_size` is the GLOBAL batch; this process yields rows
    `[process_index * batch_size / process_count, ...)` of each global batch, so the processes
    together cover every global batch exactly once. Order is a new permutation each epoch
    (`shuffle=True`), reproducible from `seed`.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, seed: int = 0,
                 shuffle: bool = True, drop_remainder: bool = True, num_epochs: int | None = None,
                 process_index: int | None = None, process_count: int | None = None):
        if not arrays:
            raise ValueError("ArrayIterator needs at least one array")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
        n = next(iter(lengths.values()))
        for k, length in lengths.items():
            if length is None:
                raise ValueError(f"ArrayIterator: array {k!r} is a scalar; need a leading row dim")
            if length != n:
                raise ValueError(f"ArrayIterator: array {k!r} has {length} rows, others have {n}")
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if batch_size < 1 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                             f"process count {process_count}")
        if drop_remainder and n < batch_size:
            from rlhf_jax.errors import UserError

            raise UserError("config.train.batch_size", f"{n} rows of data cannot fill one batch "
                            f"of {batch_size}", "use a smaller batch or more data")
        self.n = n
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_remainder = drop_remainder
        self.num_epochs = num_epochs
        self.process_index = process_index
        self.process_count = process_count
        self.epoch = 0
        self.position = 0  # rows of the current epoch already yielded (globally)
        self._perm_epoch = None
        self._perm = None

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest and not self.drop_remainder else 0)

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = (epoch_permutation(self.seed, self.epoch, self.n) if self.shuffle
                          else np.arange(self.n))
            self._perm_epoch = self.epoch
        return self._perm

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        remaining = self.n - self.position
        if remaining < self.batch_size and (self.drop_remainder or remaining == 0):
            self.epoch += 1
            self.position = 0
            remaining = self.n
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        size = min(self.batch_size, remaining)
        if size % self.process_count:
            raise ValueError(f"ArrayIterator: the last batch of an epoch has {size} rows, not "
                             f"divisible by {self.process_count} processes; use "
                             "drop_remainder=True")
        rows = self._order()[self.position:self.position + size]
        local = size // self.process_count
        rows = rows[self.process_index * local:(self.process_index + 1) * local]
        self.position += size
        return {k: v[rows] for k, v in self.arrays.items()}

    def get_state(self) -> dict:
        return {"epoch": int(self.epoch), "position": int(self.position), "seed": self.seed}

    def set_state(self, state: Mapping) -> None:
        for key in ("epoch", "position"):
            if key not in state or not isinstance(state[key], int) or state[key] < 0:
                raise ValueError(f"ArrayIterator.set_state: bad or missing {key!r} in {state!r}")
        if state["position"] > self.n:
            raise ValueError(f"ArrayIterator.set_state: position {state['position']} is past the "
                             f"{self.n} rows of the data (different data than when saved?)")
        if "seed" in state and state["seed"] != self.seed:
            raise ValueError(f"ArrayIterator.set_state: state was saved with seed {state['seed']}, "
                             f"this iterator has seed {self.seed}")
        self.epoch = state["epoch"]
        self.position = state["position"]


class PromptBatches:
    """RL prompt batches (+ optional extra rows per step, e.g. PPO-ptx pretraining text, under
    `ptx_<field>`), resumable through get/set_state like `ArrayIterator`."""

    def __init__(self, prompts: ArrayIterator, ptx: ArrayIterator | None = None):
        self.prompts, self.ptx = prompts, ptx

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self.prompts))
        if self.ptx is not None:
            batch.update({f"ptx_{k}": v for k, v in next(self.ptx).items()})
        return batch

    def get_state(self) -> dict:
        return {"prompts": self.prompts.get_state(),
                "ptx": None if self.ptx is None else self.ptx.get_state()}

    def set_state(self, state: Mapping) -> None:
        self.prompts.set_state(state["prompts"])
        if self.ptx is not None and state.get("ptx") is not None:
            self.ptx.set_state(state["ptx"])
