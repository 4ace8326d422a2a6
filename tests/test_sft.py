"""SFT / pretraining loss: prompt masking, the target shift, packing, and the shipped configs."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, ops
from rlhf_jax.data import tokenize

CFG = models.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, max_len=32)


class _Tok:
    """Minimal tokenizer: text is space-separated integer ids."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[int(w) for w in t.split()] for t in texts]}


def _reference_nll(params, tokens, prompt_len, total_len):
    """Plain loop: -sum log p(token t | tokens < t) over the completion tokens and EOS."""
    x = jnp.asarray(tokens[None, :total_len])
    mask = jnp.ones_like(x)
    logits = models.forward(CFG, params, x, models.positions_from_mask(mask), mask)["logits"][0]
    logp = jax.nn.log_softmax(logits, -1)
    return -sum(float(logp[t - 1, tokens[t]]) for t in range(prompt_len, total_len))


def test_prompt_masked_and_first_response_token_trained():
    params = models.init_params(CFG, jax.random.key(0))
    batch, _ = tokenize.encode_sft(_Tok(), ["5 6 7", "8 9"], ["10 11", "12 13 14"], max_len=10)
    # The first completion token (10, 12) is a target; prompt tokens are not.
    np.testing.assert_array_equal(batch["loss_mask"][0], [0, 0, 0, 1, 1, 1, 0, 0, 0, 0])
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    nll, sums = ops.lm_loss_sums(CFG, params, jb)
    assert float(sums["count"]) == 3 + 4  # two completion tokens + EOS, three + EOS
    ref = _reference_nll(params, batch["tokens"][0], 3, 6) + _reference_nll(params, batch["tokens"][1], 2, 6)
    np.testing.assert_allclose(float(nll), ref, rtol=1e-5)


def test_packed_and_unpacked_give_same_losses():
    params = models.init_params(CFG, jax.random.key(1))
    prompts = ["5 6 7", "8 9", "20 21 22 23", "30"]
    comps = ["10 11", "12 13 14", "15", "16 17 18 19"]
    per_example = []
    for p, c in zip(prompts, comps):
        b, _ = tokenize.encode_sft(_Tok(), [p], [c], max_len=12)
        per_example.append(float(ops.lm_loss_sums(CFG, params, {k: jnp.asarray(v) for k, v in b.items()})[0]))
    packed, _ = tokenize.encode_sft(_Tok(), prompts, comps, max_len=24, pack=True)
    assert packed["tokens"].shape[0] < len(prompts)  # really packed
    jb = {k: jnp.asarray(v) for k, v in packed.items()}
    logp, _ = ops.token_logprobs(CFG, params, jb["tokens"], jb["mask"], positions=jb["positions"],
                                 segment_ids=jb["segment_ids"])
    w = np.asarray(jb["loss_mask"][:, 1:])
    seg = np.asarray(jb["segment_ids"][:, 1:])
    got = []
    for r in range(seg.shape[0]):
        for s in sorted(set(seg[r][seg[r] > 0])):
            got.append(-float(np.sum(np.asarray(logp[r]) * w[r] * (seg[r] == s))))
    np.testing.assert_allclose(got, per_example, rtol=2e-5)


@pytest.mark.parametrize("config", ["configs/pretrain_sim.py:smoke", "configs/sft_sim.py:smoke"])
def test_shipped_config_runs_two_steps(tmp_path, config):
    workdir = tmp_path / "run"
    env = {**__import__("os").environ, "RLHF_JAX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.sft", f"--config={config}", f"--config.workdir={workdir}",
         "--config.model.preset=sim-0.1m"],
        capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["step"] == 2
    assert np.isfinite(summary["loss"]) and 0 <= summary["eos_rate"] <= 1
    assert (workdir / "final").is_dir() and (workdir / "samples.md").exists()
