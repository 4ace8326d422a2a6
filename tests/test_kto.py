"""KTO: the loss against hand values, z0 clamped at 0 and detached, the analytic loss at
policy == reference, the binary-feedback JSONL loader, comparisons -> examples, and two-step
smoke runs of the shipped config (comparisons and JSONL)."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import checkpoint, config_utils, kto, models
from rlhf_jax.data import feedback
from rlhf_jax.errors import UserError
from rlhf_jax.pref_losses import kto_loss

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def sig(x):
    return 1 / (1 + np.exp(-x))


def test_loss_against_hand_values():
    logp = jnp.array([-3.0, -5.0, -4.0])
    ref = jnp.array([-3.5, -4.0, -4.5])  # r = 0.5, -1.0, 0.5
    kl_logp = jnp.array([-6.0, -7.0, -6.5])
    kl_ref = jnp.array([-6.3, -7.1, -6.5])  # mismatched log-ratios 0.3, 0.1, 0.0 -> z0 = 0.4 / 3
    desirable = jnp.array([1.0, 0.0, 0.0])
    beta, lam_d, lam_u = 0.5, 1.0, 1.5
    z0 = 0.4 / 3
    want = np.array([lam_d * (1 - sig(beta * (0.5 - z0))), lam_u * (1 - sig(beta * (z0 + 1.0))),
                     lam_u * (1 - sig(beta * (z0 - 0.5)))])
    loss, m = kto_loss(logp, ref, kl_logp, kl_ref, desirable, beta=beta, desirable_weight=lam_d,
                       undesirable_weight=lam_u)
    np.testing.assert_allclose(loss, want.sum(), rtol=1e-6)
    np.testing.assert_allclose(m["kl"] / m["count"], z0, rtol=1e-6)
    assert float(m["count"]) == 3.0 and float(m["desirable"]) == 1.0
    # Example 0 (desirable, r > z0) and example 1 (undesirable, r < z0) are right; 2 is not.
    assert float(m["accuracy"]) == 2.0
    np.testing.assert_allclose(m["reward_desirable"], beta * 0.5, rtol=1e-6)
    np.testing.assert_allclose(m["reward_undesirable"], beta * (-1.0 + 0.5), rtol=1e-6)
    # A zero-weight (padding) row changes neither the loss nor z0.
    pad = lambda x, v: jnp.concatenate([x, jnp.array([v])])  # noqa: E731
    loss_w, m_w = kto_loss(pad(logp, 9.0), pad(ref, -9.0), pad(kl_logp, 50.0), pad(kl_ref, 0.0),
                           pad(desirable, 1.0), beta=beta, desirable_weight=lam_d,
                           undesirable_weight=lam_u, weight=jnp.array([1.0, 1.0, 1.0, 0.0]))
    np.testing.assert_allclose(loss_w, loss, rtol=1e-6)
    np.testing.assert_allclose(m_w["kl"], m["kl"], rtol=1e-6)


def test_reference_point_is_clamped_at_zero_and_not_differentiated():
    logp, ref = jnp.array([-2.0, -3.0]), jnp.array([-2.2, -2.5])
    kl_ref = jnp.array([-1.0, -1.0])
    desirable = jnp.array([1.0, 0.0])
    # A negative batch KL estimate: z0 = 0, so the loss is the one with z0 = 0.
    neg, m = kto_loss(logp, ref, jnp.array([-3.0, -2.0]), kl_ref, desirable, beta=1.0)
    zero, _ = kto_loss(logp, ref, kl_ref, kl_ref, desirable, beta=1.0)
    assert float(m["kl"]) < 0
    np.testing.assert_allclose(neg, zero, rtol=1e-7)
    np.testing.assert_allclose(neg, (1 - sig(0.2)) + (1 - sig(0.5)), rtol=1e-6)
    # z0 > 0 is detached: no gradient reaches the mismatched rows' log-probs.
    g = jax.grad(lambda k: kto_loss(logp, ref, k, kl_ref, desirable)[0])(jnp.array([0.5, 0.5]))
    np.testing.assert_array_equal(np.asarray(g), 0.0)


@pytest.mark.parametrize("lam_d,lam_u", [(1.0, 1.0), (1.0, 1.33), (2.0, 0.5)])
def test_policy_equal_to_reference_gives_lambda_over_two(lam_d, lam_u):
    """pi == pi_ref: every log-ratio is 0, so z0 = 0 and each loss is lambda (1 - sigmoid(0))."""
    cfg = models.ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, d_ff=64,
                             max_len=16)
    params = models.init_params(cfg, jax.random.key(0), ("lm",))
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 48, (4, 2, 10)).astype(np.int32)
    mask = np.ones((4, 2, 10), np.int32)
    rmask = np.zeros((4, 2, 10), np.int32)
    rmask[:, :, 4:] = 1
    batch = {"tokens": tokens, "mask": mask, "response_mask": rmask}
    logp, _ = kto.pair_logprobs(cfg, params, batch)
    desirable = jnp.array([1.0, 0.0, 1.0, 1.0])
    loss, m = kto_loss(logp[:, 0], logp[:, 0], logp[:, 1], logp[:, 1], desirable, beta=0.1,
                       desirable_weight=lam_d, undesirable_weight=lam_u)
    np.testing.assert_allclose(loss, (3 * lam_d + lam_u) / 2, rtol=1e-6)
    assert float(m["kl"]) == 0.0


def test_jsonl_loader_and_bad_row():
    ex = feedback.read_jsonl(FIX / "feedback.jsonl")  # the blank line is skipped
    assert [e["desirable"] for e in ex] == [True, False] * 4
    assert ex[1] == {"prompt": "the food was", "completion": " cold and bland.",
                     "desirable": False}
    with pytest.raises(feedback.DataFormatError) as e:
        feedback.read_jsonl(FIX / "feedback_bad.jsonl")
    assert e.value.where.endswith("feedback_bad.jsonl:2") and "'no'" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        feedback.read_jsonl(FIX / "missing.jsonl")


def test_examples_from_comparisons_and_mismatched_completions():
    recs = [{"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 2], "gold": [0, 1, -1]},
            {"prompt": "q", "responses": ["d", "e"], "ranks": [0, 1]}]
    ex, st = feedback.from_comparisons(recs)
    assert [(e["completion"], e["desirable"]) for e in ex] == [
        ("b", True), ("c", False), ("d", True), ("e", False)]
    assert ex[0]["gold"] == 1.0 and st == {"examples": 4, "desirable": 2, "undesirable": 2}
    other = feedback.mismatched(ex, seed=0)
    assert sorted(other) == sorted(e["completion"] for e in ex)  # each used once
    assert all(o != e["completion"] for o, e in zip(other, ex))  # never its own


def _sim_sft(root: Path):
    from rlhf_jax.sim.tokenizer import world_tokenizer

    tok, tok_dir = world_tokenizer(0)
    cfg = models.ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, d_ff=64,
                             max_len=64)
    sft = root / "sft"
    checkpoint.save_final(sft, jax.device_get(models.init_params(cfg, jax.random.key(0))),
                          {"model_config": cfg.to_dict(), "tokenizer_dir": str(tok_dir)}, 0)
    return sft


@pytest.mark.parametrize("extra", [[], [
    f"--config.data.source={{'kind': 'feedback_jsonl', 'train': ('{FIX / 'feedback.jsonl'}',), "
    f"'eval': ('{FIX / 'feedback.jsonl'}',)}}", "--config.kto.reference=on_the_fly"]])
def test_kto_sim_smoke(tmp_path, extra):
    sft = _sim_sft(tmp_path)
    config = config_utils.parse_config_argv([
        "kto", f"--config={ROOT / 'configs' / 'kto_sim.py'}:smoke",
        f"--config.workdir={tmp_path / 'kto'}", f"--config.init_from={sft}", *extra])
    summary = kto.run(config)
    assert summary["step"] == 2
    assert summary["sft"]["kl"] == 0.0 and np.isfinite(summary["kto"]["kl"])
    held = summary["held_out"]
    assert 0.0 <= held["accuracy"] <= 1.0 and np.isfinite(held["loss"])
    train = summary["data"]["train"]
    assert train["examples"] == summary["train_examples"] > 0
    assert train["desirable"] + train["undesirable"] == train["examples"]
    if extra:
        assert train["examples"] == 8
    else:
        assert 0.0 <= summary["win_rate_vs_sft"] <= 1.0
    params, meta = checkpoint.load_stage_params(tmp_path / "kto")
    assert "lm_head" not in params and meta["tokenizer_dir"]
