"""DPO: losses against hand values, step-0 identities, reference modes, padding, pad == EOS,
a step on a 2x2x2 mesh, and two-step smoke runs of the shipped configs."""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import checkpoint, config_utils, dpo, models, offline, sharding
from rlhf_jax import trainer as tr
from rlhf_jax.data import preferences

from tests._hf_tiny import tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
CFG = models.ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_len=32)
PAD, EOS = 0, 1


def _pair_batch(pad_left=False, pad=PAD, eos=EOS):
    """Two pairs of (prompt + response + EOS) rows, right- (or left-) padded to 12 tokens."""
    rows = [([5, 6, 7], [8, 9, eos], [10, eos]), ([11, 12], [13, eos], [14, 15, 16, eos])]
    L = 12
    tokens = np.full((2, 2, L), pad, np.int32)
    mask = np.zeros((2, 2, L), np.int32)
    rmask = np.zeros((2, 2, L), np.int32)
    for i, (p, *resps) in enumerate(rows):
        for j, r in enumerate(resps):
            seq = p + r
            start = L - len(seq) if pad_left else 0
            tokens[i, j, start:start + len(seq)] = seq
            mask[i, j, start:start + len(seq)] = 1
            rmask[i, j, start + len(p):start + len(seq)] = 1
    return {"tokens": tokens, "mask": mask, "response_mask": rmask}


def test_sigmoid_and_conservative_loss_against_hand_values():
    logp = jnp.array([[-3.0, -5.0], [-4.0, -2.0]])
    ref = jnp.array([[-3.5, -4.0], [-4.0, -2.5]])
    count = jnp.array([[2.0, 3.0], [4.0, 1.0]])
    beta = 0.5
    # h = (logp_w - ref_w) - (logp_l - ref_l): row 0: 0.5 - (-1.0) = 1.5; row 1: 0 - 0.5 = -0.5
    h = np.array([1.5, -0.5])
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    loss, m = dpo.dpo_loss(logp, ref, count, kind="sigmoid", beta=beta)
    np.testing.assert_allclose(loss, -np.log(sig(beta * h)).sum(), rtol=1e-6)
    np.testing.assert_allclose(m["reward_chosen"], beta * (0.5 + 0.0), rtol=1e-6)
    np.testing.assert_allclose(m["reward_rejected"], beta * (-1.0 + 0.5), rtol=1e-6)
    assert float(m["accuracy"]) == 1.0 and float(m["count"]) == 2.0
    eps = 0.1
    loss_c, _ = dpo.dpo_loss(logp, ref, count, kind="sigmoid", beta=beta, label_smoothing=eps)
    want = (-(1 - eps) * np.log(sig(beta * h)) - eps * np.log(sig(-beta * h))).sum()
    np.testing.assert_allclose(loss_c, want, rtol=1e-6)
    # A zero-weight (padding) pair changes nothing.
    loss_w, m_w = dpo.dpo_loss(logp, ref, count, kind="sigmoid", beta=beta,
                               weight=jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(loss_w, -np.log(sig(beta * h[0])), rtol=1e-6)
    assert float(m_w["count"]) == 1.0


def test_ipo_uses_length_averaged_logprobs():
    logp = jnp.array([[-3.0, -5.0]])
    ref = jnp.array([[-3.5, -4.0]])
    count = jnp.array([[2.0, 4.0]])
    beta = 0.25
    h = 0.5 / 2 - (-1.0) / 4  # per-token log-ratios: 0.25 - (-0.25) = 0.5
    loss, _ = dpo.dpo_loss(logp, ref, count, kind="ipo", beta=beta)
    np.testing.assert_allclose(loss, (h - 1 / (2 * beta)) ** 2, rtol=1e-6)
    with pytest.raises(ValueError, match="config.dpo.loss"):
        dpo.dpo_loss(logp, ref, count, kind="hinge")


def test_step_zero_rewards_exactly_zero_and_loss_log2():
    params = models.init_params(CFG, jax.random.key(0), ("lm",))
    batch = {k: jnp.asarray(v) for k, v in _pair_batch().items()}
    fn = jax.jit(lambda p, b: dpo.pair_logprobs(CFG, p, b))
    logp, count = fn(params, batch)
    ref, _ = fn(params, batch)  # the reference is the same policy
    loss, m = dpo.dpo_loss(logp, ref, count, kind="sigmoid", beta=0.1)
    assert float(m["reward_chosen"]) == 0.0 and float(m["reward_rejected"]) == 0.0
    assert float(m["margin"]) == 0.0 and float(m["accuracy"]) == 1.0  # ties count one half x 2
    np.testing.assert_allclose(float(loss) / 2, math.log(2.0), rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(count), [[3, 2], [2, 4]])  # response + EOS tokens


def test_left_and_right_padding_and_pad_equal_to_eos_give_the_same_logprobs():
    params = models.init_params(CFG, jax.random.key(1), ("lm",))
    fn = jax.jit(lambda b: dpo.pair_logprobs(CFG, params, b)[0])
    right = np.asarray(fn(_pair_batch()))
    np.testing.assert_allclose(np.asarray(fn(_pair_batch(pad_left=True))), right, rtol=1e-5)
    # pad == EOS (real checkpoints): the mask, not the id, says which EOS is real.
    same = _pair_batch(pad=EOS, eos=EOS)
    np.testing.assert_allclose(np.asarray(fn(same)), right, rtol=1e-5)
    # A plain loop: the summed log-probs of the response tokens of row 0, response 0.
    logits = models.forward(CFG, params, jnp.asarray([[5, 6, 7, 8, 9, EOS]]),
                            jnp.arange(6)[None], jnp.ones((1, 6), bool))["logits"][0]
    logp = jax.nn.log_softmax(logits, -1)
    want = sum(float(logp[t - 1, tok]) for t, tok in zip(range(3, 6), [8, 9, EOS]))
    np.testing.assert_allclose(right[0, 0], want, rtol=1e-5)


def test_precomputed_and_on_the_fly_reference_are_equal():
    params = models.init_params(CFG, jax.random.key(2), ("lm",))
    place = tr.Placement(config_utils.base_config())  # data = all 8 devices
    arrays = {k: np.concatenate([v] * 5) for k, v in _pair_batch().items()}  # 10 pairs
    pre = offline.precompute_reference(CFG, params, arrays, batch_size=4, place=place)["ref_logp"]
    fly = jax.jit(lambda p, b: dpo.pair_logprobs(CFG, p, b)[0])(params, arrays)
    np.testing.assert_allclose(pre, np.asarray(fly), rtol=1e-6)


def test_dpo_step_on_a_2x2x2_mesh_equals_one_device():
    policy = models.init_params(CFG, jax.random.key(3), ("lm",))
    ref = jax.tree.map(lambda x: x * 1.01, policy)
    batch = {k: np.concatenate([v] * 4) for k, v in _pair_batch().items()}
    batch["weight"] = np.ones(8, np.float32)
    # Plain SGD: the update is the gradient itself (Adam's first step is ~lr * sign(g), which
    # turns float-rounding noise in tiny gradients into whole-lr differences).
    opt = optax.sgd(0.5)

    def loss_fn(params, ref_params, b, key):
        logp, count = dpo.pair_logprobs(CFG, params, b)
        r, _ = dpo.pair_logprobs(CFG, ref_params, b)
        return dpo.dpo_loss(logp, r, count, beta=0.1, weight=b["weight"])

    step = tr.make_train_step(loss_fn, opt)
    state = tr.TrainState(step=jnp.int32(0), params=policy, opt_state=opt.init(policy))
    one, m1 = jax.jit(step)(state, ref, batch, jax.random.key(0))

    config = config_utils.base_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    place = tr.Placement(config)
    axes = models.param_axes(CFG, ("lm",))
    p_sh = place.param_shardings(axes, jax.eval_shape(lambda: policy))
    mesh_state = tr.TrainState(step=jnp.int32(0), params=jax.device_put(policy, p_sh),
                               opt_state=opt.init(jax.device_put(policy, p_sh)))
    placed_ref = place.place(ref, axes)
    assert placed_ref["layers"]["up"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
    many, m8 = jax.jit(step)(mesh_state, placed_ref, place.to_global(batch), jax.random.key(0))
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(many.params)):
        np.testing.assert_allclose(np.asarray(a), sharding.to_host(b), rtol=1e-5, atol=1e-6)
    for k in ("loss", "accuracy", "margin", "grad_norm"):
        np.testing.assert_allclose(float(m1[k]), float(m8[k]), rtol=1e-5, atol=1e-6)


def test_to_pairs_expands_rankings():
    rec = {"prompt": "p", "responses": ["a", "b", "c"], "ranks": [1, 0, 1], "gold": [0.1, 0.9, 0.2],
           "annotator": "3", "bucket": "x", "source": "s"}
    all_pairs, st = preferences.to_pairs([rec], "all_pairs")
    assert [p["responses"] for p in all_pairs] == [["b", "a"], ["b", "c"]]
    assert st["tied_pairs_skipped"] == 1 and all_pairs[0]["gold"] == [0.9, 0.1]
    strict = dict(rec, ranks=[2, 0, 1])
    assert len(preferences.to_pairs([strict], "all_pairs")[0]) == 3
    assert [p["responses"] for p in preferences.to_pairs([strict], "best_vs_rest")[0]] == [
        ["b", "a"], ["b", "c"]]
    with pytest.raises(ValueError, match="config.data.pairs"):
        preferences.to_pairs([rec], "random")


def _sim_sft(root: Path):
    from rlhf_jax.sim.tokenizer import world_tokenizer

    tok, tok_dir = world_tokenizer(0)
    cfg = models.ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, d_ff=64,
                             max_len=64)
    sft = root / "sft"
    checkpoint.save_final(sft, jax.device_get(models.init_params(cfg, jax.random.key(0))),
                          {"model_config": cfg.to_dict(), "tokenizer_dir": str(tok_dir)}, 0)
    return sft


@pytest.mark.parametrize("preset", ["smoke", "smoke,loss=ipo,reference=on_the_fly,"
                                              "candidates=mixed"])
def test_dpo_sim_smoke(tmp_path, preset):
    sft = _sim_sft(tmp_path)
    config = config_utils.parse_config_argv([
        "dpo", f"--config={ROOT / 'configs' / 'dpo_sim.py'}:{preset}",
        f"--config.workdir={tmp_path / 'dpo'}", f"--config.init_from={sft}"])
    summary = dpo.run(config)
    assert summary["step"] == 2
    assert summary["sft"]["kl"] == 0.0 and np.isfinite(summary["dpo"]["kl"])
    assert 0.0 <= summary["win_rate_vs_sft"] <= 1.0 and "gold" in summary["dpo"]
    held = summary["held_out"]
    assert 0.0 <= held["accuracy"] <= 1.0 and np.isfinite(held["margin"])
    train = summary["data"]["train"]
    assert train["pairs"] > 0 and summary["train_pairs"] == train["pairs"]
    if "mixed" in preset:
        assert train["policy"]["examples"] > 0
    params, meta = checkpoint.load_stage_params(tmp_path / "dpo")
    assert "lm_head" not in params and meta["tokenizer_dir"]


def test_dpo_hh_smoke_with_pad_equal_eos(tmp_path):
    tok = tiny_gpt2(tmp_path / "gpt2")
    assert tok.pad_token_id is None  # GPT-2 style: pad == EOS
    config = config_utils.parse_config_argv([
        "dpo", f"--config={ROOT / 'configs' / 'dpo_hh.py'}:smoke",
        f"--config.workdir={tmp_path / 'dpo'}", f"--config.init_from=hf:{tmp_path / 'gpt2'}",
        f"--config.data.source.train=('{FIX / 'hh_rlhf.jsonl'}',)",
        f"--config.data.source.eval=('{FIX / 'hh_rlhf.jsonl'}',)",
        f"--config.data.source.data_dir={tmp_path / 'tfds'}"])
    summary = dpo.run(config)
    assert summary["step"] == 2 and "win_rate_vs_sft" not in summary
    # Held out = the training pairs here: two steps at lr 1e-3 already lower their loss from
    # log 2 (policy == reference at step 0).
    assert summary["held_out"]["loss"] < math.log(2.0)
    assert summary["held_out"]["accuracy"] > 0.5
