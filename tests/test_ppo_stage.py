"""Two-update smoke runs of each shipped PPO config through the real flag parsing, the adaptive
KL coefficient across a resume, and config errors.

ppo_sim: tiny random SFT and RM checkpoints of the simulated world. ppo_hf: a tiny random GPT-2
in the Hugging Face format with a GPT-2-style tokenizer (pad == EOS) and an RM checkpoint on it,
prompts from the HH-RLHF fixture.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, config_utils, models, ppo
from rlhf_jax.metrics import read_metrics

from tests._hf_tiny import tiny_gpt2

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
NORM = {"gain": 2.0, "bias": 0.25, "method": "reference"}


def _stage_dirs(root: Path, cfg, tok_dir, policy=None):
    """A finished 'SFT' (random policy) and 'RM' (random scalar head) work dir."""
    sft, rmd = root / "sft", root / "rm"
    if policy is None:
        policy = jax.device_get(models.init_params(cfg, jax.random.key(0), ("lm",)))
    checkpoint.save_final(sft, policy, {"model_config": cfg.to_dict(),
                                        "tokenizer_dir": str(tok_dir)}, 0)
    reward = jax.device_get(models.init_params(cfg, jax.random.key(1), ("score",)))
    checkpoint.save_final(rmd, reward, {"model_config": cfg.to_dict(),
                                        "tokenizer_dir": str(tok_dir), "reward_norm": NORM}, 0)
    return sft, rmd


@pytest.fixture(scope="module")
def sim_dirs(tmp_path_factory):
    from rlhf_jax.sim.tokenizer import world_tokenizer

    tok, tok_dir = world_tokenizer(0)
    cfg = models.ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, d_ff=64,
                             max_len=64)
    return _stage_dirs(tmp_path_factory.mktemp("ppo_sim"), cfg, tok_dir)


def _config(file_arg, workdir, sft, rmd, *extra):
    return config_utils.parse_config_argv([
        "ppo", f"--config={ROOT / 'configs' / file_arg}", f"--config.workdir={workdir}",
        f"--config.init_from={sft}", f"--config.reward_from={rmd}", *extra])


REQUIRED = ("rm_score", "gold", "gold/vader", "gold/vader_trap", "kl", "kl_k3", "beta", "entropy",
            "response_length", "eos_rate", "clipfrac", "approx_kl", "value_error",
            "explained_variance", "logprob_diff_max", "ratio_first_max_dev", "pg_loss", "vf_loss",
            "time/update_s")


def test_ppo_sim_smoke_and_beta_across_resume(sim_dirs, tmp_path):
    sft, rmd = sim_dirs
    work = tmp_path / "ppo"
    config = _config("ppo_sim.py:smoke", work, sft, rmd, "--config.train.ckpt_every=1")
    summary = ppo.run(config)
    assert summary["step"] == 2 and summary["episodes"] == 2 * config.train.batch_size
    recs = read_metrics(work)
    train = {r["step"]: r for r in recs if "beta" in r}
    evals = {r["step"]: r for r in recs if "eval/gold" in r}
    assert sorted(train) == [1, 2] and sorted(evals) == [0, 2]
    for name in REQUIRED:
        assert all(np.isfinite(train[s][name]) for s in (1, 2)), name
    assert evals[0]["eval/kl"] == 0.0  # the SFT policy against itself
    assert train[1]["logprob_diff_max"] < 1e-5 and train[1]["ratio_first_max_dev"] <= 1e-6
    # Adaptive beta: Ziegler's controller applied to the previous update's KL.
    k = config.kl
    assert train[1]["beta"] == pytest.approx(k.beta)
    want = float(ppo.adaptive_beta(k.beta, train[1]["kl"], config.train.batch_size, k.target,
                                   k.horizon))
    assert train[2]["beta"] == pytest.approx(want, rel=1e-6)
    assert train[2]["beta"] < k.beta  # KL far below target lowers beta
    # Summary: SFT vs PPO on the eval prompts, and the win rate under the gold judge.
    assert summary["sft"]["kl"] == 0.0 and "gold" in summary["ppo"]
    assert 0.0 <= summary["win_rate_vs_sft"] <= 1.0
    on_disk = json.loads((work / "summary.json").read_text())
    assert on_disk["win_rate_vs_sft"] == summary["win_rate_vs_sft"]
    table = (work / "samples.md").read_text()
    assert "## step 0" in table and "## step 2" in table and "| prompt | response | rm_score |" in table
    # The final hand-off is the policy, loadable like an SFT checkpoint, and it moved.
    params, meta = checkpoint.load_stage_params(work)
    cfg = models.ModelConfig.from_dict(meta["model_config"])
    assert set(params) == set(models.abstract_params(cfg, ("lm",)))
    sft_params, _ = checkpoint.load_stage_params(sft)
    assert np.abs(params["layers"]["up"]["kernel"] - sft_params["layers"]["up"]["kernel"]).max() > 0

    # Resume for one more update: beta comes back from the checkpoint (TrainState.extra), so
    # update 3 uses the controller's value after update 2, not the config's beta.
    config3 = _config("ppo_sim.py:smoke", work, sft, rmd, "--config.train.steps=3")
    summary3 = ppo.run(config3)
    assert summary3["step"] == 3
    rec3 = [r for r in read_metrics(work) if r["step"] == 3 and "beta" in r][0]
    want3 = float(ppo.adaptive_beta(train[2]["beta"], train[2]["kl"], config.train.batch_size,
                                    k.target, k.horizon))
    assert rec3["beta"] == pytest.approx(want3, rel=1e-6)


def test_ppo_sim_value_head_kl_in_loss_ptx_fixed_beta(sim_dirs, tmp_path):
    sft, rmd = sim_dirs
    work = tmp_path / "ppo"
    config = _config("ppo_sim.py:smoke,value_from=policy_head,kl_mode=loss", work, sft, rmd,
                     "--config.ptx.coef=1.0", "--config.kl.adaptive=False",
                     "--config.ppo.whiten_rewards=True")
    summary = ppo.run(config)
    assert summary["step"] == 2
    train = [r for r in read_metrics(work) if "beta" in r]
    assert [r["beta"] for r in train] == pytest.approx([config.kl.beta] * 2)
    for r in train:
        assert r["kl_loss"] >= 0.0 and r["ptx_loss"] > 0.0
        assert r["logprob_diff_max"] < 1e-5 and r["ratio_first_max_dev"] <= 1e-6
    assert train[0]["value_mean"] == 0.0  # zero-initialised value head
    assert train[1]["value_mean"] != 0.0  # ... that the value loss trained
    # KL in the loss: the reward is the score alone, with no -beta*KL part.
    assert train[1]["kl"] != 0.0 and train[1]["non_score_reward"] == 0.0
    assert train[1]["return"] == pytest.approx(train[1]["score"], rel=1e-5, abs=1e-6)


def test_ppo_hf_smoke(tmp_path):
    from rlhf_jax.models import hf

    fast = tiny_gpt2(tmp_path / "gpt2")
    assert fast.pad_token_id is None  # pad == EOS: only masks tell them apart
    cfg, _ = hf.load_hf(str(tmp_path / "gpt2"), dtype="float32")
    _, rmd = _stage_dirs(tmp_path, cfg, tmp_path / "gpt2")
    work = tmp_path / "ppo"
    config = _config("ppo_hf.py:smoke", work, f"hf:{tmp_path / 'gpt2'}", rmd,
                     f"--config.data.source.train=('{FIX / 'hh_rlhf.jsonl'}',)",
                     f"--config.data.source.eval=('{FIX / 'hh_rlhf_bad.jsonl'}',)",
                     "--config.data.source.skip_bad_rows=True",
                     f"--config.data.source.data_dir={tmp_path / 'tfds'}")
    summary = ppo.run(config)
    assert summary["step"] == 2 and "win_rate_vs_sft" not in summary  # no gold judge
    train = [r for r in read_metrics(work) if "beta" in r]
    assert len(train) == 2 and all("gold" not in r for r in train)
    assert train[0]["logprob_diff_max"] < 1e-5
    assert [r["beta"] for r in train] == pytest.approx([0.02, 0.02])  # InstructGPT, fixed
    params, meta = checkpoint.load_stage_params(work)
    assert meta["tokenizer_dir"] == str(tmp_path / "gpt2")


@pytest.mark.parametrize("override,match", [
    ("--config.kl.mode=both", "config.kl.mode: 'both' is not one of the options"),
    ("--config.value_from=critic", "config.value_from: 'critic'"),
    ("--config.ppo.minibatches=3", "config.ppo.minibatches=3"),
    ("--config.eval.gold=oracle", "config.eval.gold: 'oracle'"),
    ("--config.rollout.temperature=0.0", "config.rollout.temperature: 0.0 is not valid"),
])
def test_config_errors_name_the_field(override, match, tmp_path):
    config = _config("ppo_sim.py:smoke", tmp_path / "w", "sft", "rm", override)
    with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
        ppo.run(config)
    with pytest.raises(ValueError, match="config.init_from: is empty"):
        ppo.run(_config("ppo_sim.py:smoke", tmp_path / "w", "", "rm"))
