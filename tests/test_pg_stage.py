"""Two-update smoke runs of the critic-free stage (rlhf_jax.pg) through the real flag parsing:
configs/pg_sim.py for each method preset, configs/pg_hf.py on a tiny random GPT-2, and config
errors. The SFT and RM "stages" are tiny random checkpoints (tests/_sim_stages.py)."""

import json

import numpy as np
import pytest

from rlhf_jax import checkpoint, config_utils, models, pg
from rlhf_jax.metrics import read_metrics

from tests._hf_tiny import tiny_gpt2
from tests._sim_stages import sim_stage_dirs
from tests.test_ppo_stage import FIX, ROOT, _stage_dirs


@pytest.fixture(scope="module")
def sim_dirs(tmp_path_factory):
    return sim_stage_dirs(tmp_path_factory.mktemp("pg_sim"))


def _config(file_arg, workdir, sft, rmd, *extra):
    return config_utils.parse_config_argv([
        "pg", f"--config={ROOT / 'configs' / file_arg}", f"--config.workdir={workdir}",
        f"--config.init_from={sft}", f"--config.reward_from={rmd}", *extra])


REQUIRED = ("rm_score", "score", "gold", "gold/vader", "kl", "kl_k3", "entropy", "return",
            "response_length", "eos_rate", "logprob_diff_max", "reward_std", "advantage_std",
            "group_reward_std", "zero_adv_group_frac", "pg_loss", "loss", "clipfrac",
            "clipfrac_low", "clipfrac_high", "approx_kl", "grad_norm", "ratio_first_max_dev",
            "kl_ref_k1", "kl_ref_k3", "beta", "time/update_s")


# rloo and grpo run in CI; dr_grpo and reinforce differ from them only in the estimator and
# aggregation that tests/test_pg_update.py and test_pg_math.py check, so their ~30 s stage runs
# are slow-marked (pytest -m slow).
@pytest.mark.parametrize("method", ["rloo", "grpo",
                                    pytest.param("dr_grpo", marks=pytest.mark.slow),
                                    pytest.param("reinforce", marks=pytest.mark.slow)])
def test_pg_sim_smoke_each_method(method, sim_dirs, tmp_path):
    sft, rmd = sim_dirs
    work = tmp_path / method
    config = _config(f"pg_sim.py:smoke,method={method}", work, sft, rmd)
    summary = pg.run(config)
    K, P = config.pg.group_size, config.train.batch_size
    assert summary["step"] == 2 and summary["estimator"] == method
    assert summary["episodes"] == 2 * P * K and summary["prompts"] == 2 * P
    recs = read_metrics(work)
    train = {r["step"]: r for r in recs if "zero_adv_group_frac" in r}
    evals = {r["step"]: r for r in recs if "eval/gold" in r}
    assert sorted(train) == [1, 2] and sorted(evals) == [0, 2]
    for name in REQUIRED:
        assert all(np.isfinite(train[s][name]) for s in (1, 2)), name
    t1 = train[1]
    assert 0.0 < t1["eos_rate"] < 1.0
    assert t1["logprob_diff_max"] < 1e-5 and t1["ratio_first_max_dev"] <= 1e-6
    assert 0.0 <= t1["zero_adv_group_frac"] <= 1.0 and t1["group_reward_std"] >= 0.0
    assert t1["beta"] == pytest.approx(config.kl.beta)
    if config.kl.mode == "reward":  # the sequence reward is score - beta * sum_t k1
        assert t1["return"] == pytest.approx(t1["score"] - config.kl.beta * t1["kl"], abs=1e-5)
        assert "kl_loss" not in t1
    else:  # KL in the loss: the reward is the score alone
        assert t1["non_score_reward"] == 0.0
        assert t1["return"] == pytest.approx(t1["score"], abs=1e-6)
        assert t1["kl_loss"] >= 0.0  # k3 >= 0
    if method != "reinforce":  # group baselines: advantages sum to zero in every group
        assert abs(t1["advantage_mean"]) < 1e-5
    # Summary against SFT on the eval prompts; the hand-off is the policy alone, and it moved.
    assert evals[0]["eval/kl"] == 0.0 and 0.0 <= summary["win_rate_vs_sft"] <= 1.0
    on_disk = json.loads((work / "summary.json").read_text())
    assert on_disk["win_rate_vs_sft"] == summary["win_rate_vs_sft"] and method in on_disk
    params, meta = checkpoint.load_stage_params(work)
    cfg = models.ModelConfig.from_dict(meta["model_config"])
    assert set(params) == set(models.abstract_params(cfg, ("lm",)))
    sft_params, _ = checkpoint.load_stage_params(sft)
    assert np.abs(params["layers"]["up"]["kernel"]
                  - sft_params["layers"]["up"]["kernel"]).max() > 0


def test_pg_hf_smoke(tmp_path):
    from rlhf_jax.models import hf

    tiny_gpt2(tmp_path / "gpt2")
    cfg, _ = hf.load_hf(str(tmp_path / "gpt2"), dtype="float32")
    _, rmd = _stage_dirs(tmp_path, cfg, tmp_path / "gpt2")
    work = tmp_path / "grpo"
    config = _config("pg_hf.py:smoke,method=grpo", work, f"hf:{tmp_path / 'gpt2'}", rmd,
                     f"--config.data.source.train=('{FIX / 'hh_rlhf.jsonl'}',)",
                     f"--config.data.source.eval=('{FIX / 'hh_rlhf_bad.jsonl'}',)",
                     "--config.data.source.skip_bad_rows=True",
                     f"--config.data.source.data_dir={tmp_path / 'tfds'}")
    summary = pg.run(config)
    assert summary["step"] == 2 and "win_rate_vs_sft" not in summary  # no gold judge
    train = [r for r in read_metrics(work) if "zero_adv_group_frac" in r]
    assert len(train) == 2 and all("gold" not in r for r in train)
    assert train[0]["logprob_diff_max"] < 1e-5 and train[0]["ratio_first_max_dev"] <= 1e-6
    assert [r["beta"] for r in train] == pytest.approx([0.04, 0.04])  # GRPO's
    _, meta = checkpoint.load_stage_params(work)
    assert meta["tokenizer_dir"] == str(tmp_path / "gpt2")


@pytest.mark.parametrize("override,match", [
    ("--config.kl.mode=both", "config.kl.mode: unknown mode 'both'"),
    ("--config.pg.estimator=ppo", "config.pg.estimator: unknown estimator 'ppo'"),
    ("--config.pg.minibatches=3", "config.pg.minibatches: 8 prompts x 2 samples = 16 episodes"),
    ("--config.pg.aggregation=sum", "config.pg.aggregation: unknown aggregation 'sum'"),
    ("--config.pg.clip_low=1.5", "config.pg.clip_low: 1.5 is out of range"),
    ("--config.pg.loss_normalizer=-1.0", "config.pg.loss_normalizer: -1.0 is not valid"),
    ("--config.eval.gold=oracle", "config.eval.gold: 'oracle'"),
    ("--config.rollout.temperature=0.0", "config.rollout.temperature: 0.0 is not valid"),
])
def test_config_errors_name_the_field(override, match, tmp_path):
    config = _config("pg_sim.py:smoke", tmp_path / "w", "sft", "rm", override)
    with pytest.raises(ValueError, match=match.replace(".", r"\.").replace("(", r"\(")):
        pg.run(config)
    with pytest.raises(ValueError, match="config.init_from: is empty"):
        pg.run(_config("pg_sim.py:smoke", tmp_path / "w", "", "rm"))
    with pytest.raises(ValueError, match="is not a method"):
        _config("pg_sim.py:method=ppo", tmp_path / "w", "sft", "rm")
