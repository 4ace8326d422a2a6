"""A toy NNX language model, its config and a runnable stage, for the loop/checkpoint tests.

Same conventions as `rlhf_jax.models`: params are the pure dict of `nnx.state(model, nnx.Param)`,
logical axes come from each Param's `out_sharding` metadata. Also a config file
(`--config=tests/_toy.py:steps=8`) and an entry point (`python tests/_toy.py --config=...`) so
subprocess tests exercise the real flag parsing, kills and multi-process runs.

Test hooks (env): TOY_SIGKILL_BEFORE_STEP=n / TOY_SIGTERM_BEFORE_STEP=n make the process signal
itself while fetching the batch of step n.
"""

from __future__ import annotations

import functools
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import rlhf_jax  # noqa: F401  (sets flax_always_shard_variable=False)
from rlhf_jax import config_utils, optim, sharding
from rlhf_jax.data.iterators import ArrayIterator

VOCAB, EMBED, MLP, LENGTH = 32, 16, 32, 8


class ToyLM(nnx.Module):
    """Bigram-ish LM: embed → MLP → vocab logits (no attention; enough to train and shard)."""

    def __init__(self, rngs: nnx.Rngs):
        init = nnx.initializers
        self.embed = nnx.Embed(VOCAB, EMBED, rngs=rngs, embedding_init=nnx.with_partitioning(
            init.normal(0.5), ("vocab", "embed")))
        self.up = nnx.Linear(EMBED, MLP, rngs=rngs,
                             kernel_init=nnx.with_partitioning(init.lecun_normal(),
                                                               ("embed", "mlp")),
                             bias_init=nnx.with_partitioning(init.zeros_init(), ("mlp",)))
        self.down = nnx.Linear(MLP, VOCAB, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init.lecun_normal(),
                                                                 ("mlp", "vocab")),
                               bias_init=nnx.with_partitioning(init.zeros_init(), ("vocab",)))

    def __call__(self, tokens, noise):
        h = self.embed(tokens) * (1.0 + noise)
        return self.down(jax.nn.gelu(self.up(h)))


def _abstract_model():
    return nnx.eval_shape(lambda: ToyLM(nnx.Rngs(0)))


def init_params(rng) -> dict:
    return nnx.to_pure_dict(nnx.state(ToyLM(nnx.Rngs(params=rng)), nnx.Param))


def param_axes() -> dict:
    return sharding.axes_from_state(nnx.state(_abstract_model(), nnx.Param))


def forward(params, tokens, noise):
    graphdef, state = nnx.split(_abstract_model(), nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(tokens, noise)


def loss_fn(params, frozen, batch, rng, noise_scale=0.0):
    """Token-weighted next-token CE: (sum over target tokens, {"count", "correct"} sums)."""
    tokens, mask = batch["tokens"], batch["loss_mask"]
    inputs, targets, weights = tokens[:, :-1], tokens[:, 1:], mask[:, 1:].astype(jnp.float32)
    noise = noise_scale * jax.random.normal(rng, inputs.shape + (1,))
    logits = forward(params, inputs, noise)
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(nll * weights), {"count": jnp.sum(weights),
                                    "accuracy": jnp.sum(correct * weights)}


def make_data(n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences from a fixed random bigram table, with ragged target masks."""
    rng = np.random.default_rng(seed)
    table = rng.dirichlet(np.full(VOCAB, 0.3), size=VOCAB)
    tokens = np.zeros((n, LENGTH), np.int32)
    tokens[:, 0] = rng.integers(0, VOCAB, n)
    for t in range(1, LENGTH):
        tokens[:, t] = [rng.choice(VOCAB, p=table[a]) for a in tokens[:, t - 1]]
    lengths = rng.integers(2, LENGTH + 1, n)
    mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
    return {"tokens": tokens, "loss_mask": mask}


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(preset, ("steps", "ckpt_every", "accum", "batch"), "_toy.py")
    c = config_utils.base_config()
    c.workdir = "/tmp/toy"
    c.seed = 1
    c.optim.lr = 3e-2
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 2
    c.optim.weight_decay = 0.01
    c.train.steps = preset.get("steps", 8)
    c.train.batch_size = preset.get("batch", 16)
    c.train.accum_steps = preset.get("accum", 2)
    c.train.ckpt_every = preset.get("ckpt_every", 2)
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.eval_batches = 2
    c.noise = 0.1  # scale of the rng-driven input noise (checks per-step rng on resume)
    c.data_seed = 0
    c.lock()
    return c


class _Hooks:
    """Pass-through iterator that signals this process at a given step (test hook)."""

    def __init__(self, inner, first_step: int):
        self.inner, self.step = inner, first_step
        self.kill = int(os.environ.get("TOY_SIGKILL_BEFORE_STEP", 0))
        self.term = int(os.environ.get("TOY_SIGTERM_BEFORE_STEP", 0))

    def __iter__(self):
        return self

    def __next__(self):
        if self.step == self.kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.step == self.term:
            os.kill(os.getpid(), signal.SIGTERM)
        self.step += 1
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def run(config):
    """The toy stage: train the ToyLM with the shared Trainer. Returns the Trainer's summary."""
    from rlhf_jax import trainer as tr

    trainer = tr.Trainer(config, "toy")
    data = make_data(seed=config.data_seed)
    train = {k: v[:48] for k, v in data.items()}
    held_out = {k: v[48:] for k, v in data.items()}
    optimizer = optim.make_optimizer(config.optim, config.train.steps)
    state, _ = trainer.create_state(lambda: init_params(jax.random.key(config.seed)),
                                    param_axes(), optimizer)
    step = tr.make_train_step(functools.partial(loss_fn, noise_scale=config.noise), optimizer,
                              config.train.accum_steps)
    eval_step = trainer.jit_eval(tr.make_eval_step(loss_fn))

    def eval_fn(st):
        batches = ArrayIterator(held_out, 8, seed=0, shuffle=False)
        return trainer.evaluate(eval_step, st.params, batches)

    trainer.metadata["model"] = {"vocab": VOCAB, "embed": EMBED, "mlp": MLP}
    train_iter = _Hooks(ArrayIterator(train, config.train.batch_size, seed=config.seed),
                        first_step=int(state.step) + 1)
    state = trainer.fit(state, step, train_iter, eval_fn=eval_fn)
    trainer.close()
    return trainer.summary


if __name__ == "__main__":
    config_utils.run_with_config(lambda config: run(config) and None)
