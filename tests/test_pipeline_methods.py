"""The pipeline's method comparison with the critic-free methods, online DPO and best-of-n, in process, on
tiny random SFT / RM stages (the base, SFT and RM stages are replaced; tests/test_pipeline.py
runs them for real): every method trains through its own config field, and one table and one
gold-vs-KL figure hold them all."""

import json

from rlhf_jax import config_utils

from tests._sim_stages import sim_stage_dirs
from tests.test_ppo_stage import ROOT

METHODS = ("rloo", "grpo", "dr_grpo")


def test_pipeline_with_critic_free_methods_and_best_of_n(tmp_path, capsys, monkeypatch):
    from configs import online_dpo_sim, pg_sim
    from experiments import pipeline

    sft, rmd = sim_stage_dirs(tmp_path / "stages")
    monkeypatch.setattr(pipeline, "base_stages",
                        lambda config: ({"base": sft, "sft": sft, "rm": rmd}, None))
    config = config_utils.parse_config_argv([
        "pipeline", f"--config={ROOT / 'configs' / 'pipeline_sim.py'}:tiny",
        f"--config.workdir={tmp_path / 'pipe'}", "--config.methods=rloo,grpo,dr_grpo,online_dpo,bon",
        "--config.bon.n=4", "--config.eval.num_prompts=16", "--config.eval.batch_size=64"])
    # Each method's fields come from its configs/pg_sim.py preset; train two updates.
    assert [config[m].pg.estimator for m in METHODS] == list(METHODS)
    assert config.grpo.kl.mode == "loss" and config.rloo.kl.mode == "reward"
    with config.unlocked():
        for m in METHODS:
            config[m] = pg_sim.get_config(f"smoke,method={m}")
        config.online_dpo = online_dpo_sim.get_config("smoke")
    summary = pipeline.run(config)
    for m in (*METHODS, "online_dpo", "bon", "sft"):
        r = summary[m]
        assert 0.0 <= r["win_rate_vs_sft"] <= 1.0 and "gold" in r and "rm_score" in r, m
    assert summary["sft"]["win_rate_vs_sft"] == 0.5
    for m in METHODS:
        stage = json.loads((tmp_path / "pipe" / "stages").glob(f"{m}-*").__next__()
                           .joinpath("summary.json").read_text())
        assert stage["estimator"] == m and stage["step"] == 2
    assert summary["bon"]["kl"] > 0  # KL_bon = log 4 - 3/4
    out = capsys.readouterr().out
    for m in ("RLOO", "GRPO", "DR_GRPO", "ONLINE_DPO", "BON", "SFT"):
        assert f"  {m} " in out, m
    assert (tmp_path / "pipe" / "gold_vs_kl.png").stat().st_size > 1000
