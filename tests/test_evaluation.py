"""Policy evaluation helpers: sequence KL against a plain loop, response decoding."""

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import models
from rlhf_jax.evaluation import decode_responses, sequence_kl

CFG = models.ModelConfig(vocab_size=30, d_model=32, n_layers=2, n_heads=4, max_len=32)


def _loop_kl(p, q, tokens, mask, prompt_len, temperature):
    total = 0.0
    x = jnp.asarray(tokens[None])
    m = jnp.asarray(mask[None])
    pos = models.positions_from_mask(m)
    lp = jax.nn.log_softmax(models.forward(CFG, p, x, pos, m)["logits"][0] / temperature, -1)
    lq = jax.nn.log_softmax(models.forward(CFG, q, x, pos, m)["logits"][0] / temperature, -1)
    for t in range(prompt_len, len(tokens)):
        if mask[t]:
            total += float(lp[t - 1, tokens[t]] - lq[t - 1, tokens[t]])
    return total


def test_sequence_kl_matches_loop_and_is_zero_for_same_policy():
    p = models.init_params(CFG, jax.random.key(0))
    q = models.init_params(CFG, jax.random.key(1))
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, 30, size=(3, 9)).astype(np.int32)
    # Left-padded prompts of length 4, responses of different lengths (right-padded).
    mask = np.array([[0, 1, 1, 1, 1, 1, 1, 0, 0],
                     [1, 1, 1, 1, 1, 1, 1, 1, 1],
                     [0, 0, 1, 1, 1, 0, 0, 0, 0]], np.int32)
    got = sequence_kl(CFG, p, q, tokens, mask, prompt_len=4, temperature=0.7, batch_size=2)
    want = [_loop_kl(p, q, tokens[i], mask[i], 4, 0.7) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sequence_kl(CFG, p, p, tokens, mask, 4, 0.7), 0.0, atol=1e-6)


class _Tok:
    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def test_decode_stops_at_mask_and_drops_eos():
    tokens = np.array([[5, 6, 1, 0], [7, 8, 9, 10]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    assert decode_responses(_Tok(), tokens, mask) == ["5 6", "7 8 9 10"]
