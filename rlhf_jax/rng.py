"""Named random streams: every key of a run is `fold_in(key(seed), purpose, *index)`.

One table of purposes instead of magic `fold_in` numbers scattered over the stages (DESIGN.md:
"derive every key with fold_in and a named purpose"), so two uses never share a stream by
accident. The values of the purposes that existed before this table are kept, so seeded results
did not move when it was introduced.

Inside a training step the step's key (`key(seed, TRAIN, step)`) is split further with
`StepUse`: microbatch i of a supervised step uses `fold_in(fold_in(step_key, MICROBATCH), i)`
(`trainer.make_train_step`), and a rollout samples with `fold_in(step_key, SAMPLE)`.
"""

from __future__ import annotations

import enum

import jax


class Purpose(enum.IntEnum):
    TRAIN = 0  # training step s (index: s)
    EVAL = 1  # held-out batch i of a loss evaluation (index: i)
    SHUFFLE = 2  # minibatch permutations of an on-policy update (index: update, epoch)
    POLICY_EVAL = 3  # samples of a policy evaluation (index: chunk)
    INIT = 17  # fresh heads (reward / value / classification)
    POLICY_DATA = 1000  # policy samples that become training data (index: split)
    NORM = 2000  # reference samples of the reward normalisation
    RM_EVAL = 3000  # fresh samples that an RM evaluation scores
    COMPARE = 1234  # the pipeline's method comparison (index: method)
    BEST_OF_N = 4000  # best-of-n candidate samples (index: chunk)
    BEST_OF_N_CURVES = 4100  # best-of-n curves (experiments/best_of_n, gao_bon, ...): N per prompt
    PROBES = 5000  # failure-mode probe samples: a fold of a policy evaluation's key


class StepUse(enum.IntEnum):
    """Folds of one training step's key."""

    SAMPLE = 1  # a rollout's sampling inside an RL step
    MICROBATCH = 2  # microbatch i of a supervised step (index: i)


def step_key(step_rng: jax.Array, use: StepUse, *index: int) -> jax.Array:
    """Sub-key `use` (and `index...`) of one training step's key."""
    k = jax.random.fold_in(step_rng, int(use))
    for i in index:
        k = jax.random.fold_in(k, i)
    return k


def key(seed: int, purpose: Purpose, *index: int) -> jax.Array:
    """The key of stream `purpose` (and sub-stream `index...`) of a run seeded with `seed`."""
    k = jax.random.fold_in(jax.random.key(int(seed)), int(purpose))
    for i in index:
        k = jax.random.fold_in(k, i)
    return k
