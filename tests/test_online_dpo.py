"""Online DPO (rlhf_jax.online_dpo): the chosen / rejected pair follows the judge's scores (swap
the judge's sign and every pair swaps), the reference stays frozen while the policy trains, and
two-update smoke runs of the stage with the RM and with the gold judge as the labeller."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import checkpoint, config_utils, models, online_dpo
from rlhf_jax.metrics import read_metrics

from tests._sim_stages import sim_stage_dirs
from tests.test_ppo_stage import ROOT

POLICY = models.ModelConfig(vocab_size=24, d_model=32, n_layers=1, n_heads=2, d_ff=64,
                            max_len=64)
EOS, PAD = 1, 0
PROMPTS, L, N = 8, 5, 8
OPT = optax.adam(3e-3)


def _settings(**kw):
    base = dict(policy=POLICY, reward=POLICY, reward_gain=1.5, reward_bias=0.0, max_new_tokens=N,
                temperature=0.7, eos_id=EOS, pad_id=PAD, no_eos_score=None, epochs=2,
                minibatches=2, beta=0.1)
    return online_dpo.Settings(**{**base, **kw})


@functools.cache
def _models():
    ref = models.init_params(POLICY, jax.random.key(0), ("lm",))
    ref["embed"]["embedding"] = ref["embed"]["embedding"].at[EOS].multiply(20.0)  # some end
    reward = models.init_params(POLICY, jax.random.key(1), ("score",))
    rng = np.random.default_rng(0)
    toks = rng.integers(3, 24, (PROMPTS, L)).astype(np.int32)
    mask = np.ones((PROMPTS, L), np.int32)
    mask[::2, :2] = 0
    return ref, reward, np.where(mask == 1, toks, PAD), mask


def test_preference_pairs_order_and_ties():
    order, weight = online_dpo.preference_pairs(jnp.asarray([0.3, 0.9, 2.0, -1.0, 0.5, 0.5]))
    np.testing.assert_array_equal(order, [[1, 0], [0, 1], [0, 1]])
    np.testing.assert_array_equal(weight, [1.0, 1.0, 0.0])  # a tie is no preference


def test_pair_follows_the_judge_and_swaps_with_its_sign():
    ref, reward, toks, mask = _models()
    pairs = {}
    for sign in (1.0, -1.0):  # the same samples (same key), the RM's sign flipped
        s = _settings(reward_gain=1.5 * sign)
        data, rows, _ = jax.jit(functools.partial(online_dpo.rollout, s))(
            ref, ref, reward, toks, mask, jax.random.key(3))
        scores = np.asarray(data["scores"]).reshape(-1, 2)
        p = jax.jit(functools.partial(online_dpo.to_pairs, s))(data)
        # The chosen row of each pair is the one the judge scored higher.
        seq = np.asarray(data["tokens"]).reshape(PROMPTS, 2, -1)
        want = np.where((scores[:, 0] >= scores[:, 1])[:, None], seq[:, 0], seq[:, 1])
        np.testing.assert_array_equal(np.asarray(p["tokens"])[:, 0], want)
        pairs[sign] = jax.tree.map(np.asarray, p)
    up, down = pairs[1.0], pairs[-1.0]
    # Ties (two identical samples) are no preference either way; every other pair swaps.
    t = up["weight"] == 1
    np.testing.assert_array_equal(up["weight"], down["weight"])
    assert t.sum() >= PROMPTS // 2, up["weight"]
    np.testing.assert_array_equal(up["tokens"][t, 0], down["tokens"][t, 1])
    np.testing.assert_array_equal(up["tokens"][t, 1], down["tokens"][t, 0])
    np.testing.assert_array_equal(up["ref_logp"][t, ::-1], down["ref_logp"][t])
    assert not np.array_equal(up["tokens"][t, 0], up["tokens"][t, 1])
    # A gold judge's scores (the driver's `rescore`) decide the same way: here, the RM negated.
    data, _, _ = jax.jit(functools.partial(online_dpo.rollout, _settings()))(
        ref, ref, reward, toks, mask, jax.random.key(3))
    gold = jax.jit(functools.partial(online_dpo.to_pairs, _settings()))(
        {**data, "scores": -data["scores"]})
    np.testing.assert_array_equal(np.asarray(gold["tokens"]), down["tokens"])


def test_reference_stays_frozen_while_the_policy_trains():
    ref, reward, toks, mask = _models()
    s = _settings(no_eos_score=-1.0, epochs=1, minibatches=1)
    ref_before = jax.tree.map(np.array, ref)
    rollout = jax.jit(functools.partial(online_dpo.rollout, s))
    # As the driver: params and optimizer state donated to the update, ref a jit argument.
    update = jax.jit(functools.partial(online_dpo.update, s, OPT), donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, ref)
    opt_state = OPT.init(params)
    losses = []
    for step in range(3):
        data, _, _ = rollout(params, ref, reward, toks, mask, jax.random.key(10 + step))
        params, opt_state, m = update(params, opt_state, data, jax.random.key(5), step)
        losses.append(float(m["loss"]))
    for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(ref_before)):
        np.testing.assert_array_equal(np.asarray(a), b)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params),
                                                             jax.tree.leaves(ref_before)))
    assert moved > 1e-4
    # The reference log-probs of a rollout are the frozen SFT policy's, not the trained one's:
    # at step 0 (policy == reference) the loss is log 2; the implicit rewards are then nonzero.
    assert losses[0] == pytest.approx(np.log(2.0), abs=1e-5)
    data, _, metrics = rollout(params, ref, reward, toks, mask, jax.random.key(20))
    assert abs(float(metrics["kl"])) > 1e-4


@pytest.mark.parametrize("judge", ["rm", "gold"])
def test_online_dpo_stage_smoke(judge, tmp_path_factory, tmp_path):
    sft, rmd = sim_stage_dirs(tmp_path_factory.mktemp("odpo"))
    work = tmp_path / "odpo"
    config = config_utils.parse_config_argv([
        "online_dpo", f"--config={ROOT / 'configs' / 'online_dpo_sim.py'}:smoke,judge={judge}",
        f"--config.workdir={work}", f"--config.init_from={sft}", f"--config.reward_from={rmd}",
        "--config.online_dpo.epochs=1", "--config.online_dpo.minibatches=1"])
    summary = online_dpo.run(config)
    P = config.train.batch_size
    assert summary["step"] == 2 and summary["pairs"] == 2 * P and summary["judge"] == judge
    train = {r["step"]: r for r in read_metrics(work) if "margin" in r}
    evals = {r["step"]: r for r in read_metrics(work) if "eval/gold" in r}
    assert sorted(train) == [1, 2] and sorted(evals) == [0, 2]
    for name in ("loss", "accuracy", "margin", "kl", "rm_score", "gold", "grad_norm", "pairs",
                 "tie_frac", "beta", "time/update_s"):
        assert all(np.isfinite(train[s][name]) for s in (1, 2)), name
    if train[1]["pairs"] > 0:  # some pair is not a tie
        assert train[1]["loss"] == pytest.approx(np.log(2.0), abs=1e-4)  # policy == reference
    assert evals[0]["eval/kl"] == 0.0 and 0.0 <= summary["win_rate_vs_sft"] <= 1.0
    params, meta = checkpoint.load_stage_params(work)
    sft_params, _ = checkpoint.load_stage_params(sft)
    assert set(params) == set(sft_params)
    assert np.abs(params["layers"]["up"]["kernel"]
                  - sft_params["layers"]["up"]["kernel"]).max() > 0
