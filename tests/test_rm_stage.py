"""Two-step smoke runs of each shipped RM config, through the real flag parsing.

rm_sim: from a (tiny, random) SFT checkpoint of the simulated world. rm_hh: from a tiny random
GPT-2 saved in the Hugging Face format with a GPT-2-style tokenizer (no pad token, so
pad == EOS), on the HH-RLHF fixture files.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, config_utils, models, rewards, rm
from rlhf_jax.data import tokenize

from tests._hf_tiny import tiny_gpt2


def _tiny_gpt2(path):
    return tiny_gpt2(path, fixtures=("hh_rlhf.jsonl", "hh_rlhf_bad.jsonl"), vocab_size=400,
                     n_positions=128, bos_is_eos=True)

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"


def _check_final(workdir, summary, method):
    params, meta = checkpoint.load_stage_params(workdir)
    assert "score_head" in params and "lm_head" not in params
    norm = meta["reward_norm"]
    assert norm == summary["reward_norm"] and norm["method"] == method
    assert np.isfinite(norm["gain"]) and norm["gain"] > 0
    cfg = models.ModelConfig.from_dict(meta["model_config"])
    return cfg, params, meta


def _sim_sft(tmp_path):
    """A finished 'SFT' work dir of the simulated world: a tiny random policy."""
    from rlhf_jax.sim.tokenizer import world_tokenizer

    tok, tok_dir = world_tokenizer(0)
    cfg = models.ModelConfig(vocab_size=len(tok), d_model=32, n_layers=1, n_heads=2, d_ff=64,
                             max_len=64)
    sft = tmp_path / "sft"
    sft_params = jax.device_get(models.init_params(cfg, jax.random.key(0), ("lm",)))
    checkpoint.save_final(sft, sft_params, {"model_config": cfg.to_dict(),
                                            "tokenizer_dir": str(tok_dir)}, 0)
    return tok, cfg, sft, sft_params


def test_rm_sim_smoke(tmp_path):
    tok, cfg, sft, sft_params = _sim_sft(tmp_path)
    config = config_utils.parse_config_argv([
        "rm", f"--config={ROOT / 'configs' / 'rm_sim.py'}:smoke",
        f"--config.workdir={tmp_path / 'rm'}", f"--config.init_from={sft}"])
    summary = rm.run(config)
    assert summary["step"] == 2
    assert 0.0 <= summary["held_out_accuracy"] <= 1.0
    # The ceiling is computed on the same held-out labels from the stored gold scores.
    assert 0.5 < summary["gold_ceiling_accuracy"] <= 1.0
    assert summary["held_out_pairs"] == 32 * 6  # 32 held-out rankings of K = 4
    assert {"0:unbiased", "5:noisy"} <= set(summary["per_annotator"])
    assert sum(v["pairs"] for v in summary["per_annotator"].values()) == summary["held_out_pairs"]
    assert sum(b["pairs"] for b in summary["calibration"]) == summary["held_out_pairs"]
    assert set(summary["judge_agreement"]["world_pairs"]) == {"vader", "vader_trap"}
    assert set(summary["judge_agreement"]["policy_pairs"]) == {"vader", "vader_trap"}
    on_disk = json.loads((tmp_path / "rm" / "summary.json").read_text())
    assert on_disk["held_out_accuracy"] == summary["held_out_accuracy"]

    rm_cfg, params, meta = _check_final(tmp_path / "rm", summary, "reference")
    # The trunk came from the SFT checkpoint (two small steps away from it), the head is new.
    emb0, emb1 = sft_params["embed"]["embedding"], params["embed"]["embedding"]
    assert np.abs(emb1 - emb0).max() < 0.05 and np.abs(emb1 - emb0).max() > 0
    # The stored normalisation is what score_sequences applies.
    pad_id, _ = tokenize.special_ids(tok)
    batch, _ = tokenize.encode_sft(tok, ["the movie was"], [" very good ."], 16)
    raw = rewards.score_sequences(rm_cfg, params, batch["tokens"], batch["mask"])
    normed = rewards.score_sequences(rm_cfg, params, batch["tokens"], batch["mask"], meta["reward_norm"])
    gain, bias = meta["reward_norm"]["gain"], meta["reward_norm"]["bias"]
    np.testing.assert_allclose(np.asarray(normed), np.asarray(raw) * gain + bias,
                               rtol=1e-5, atol=1e-6)


def test_rm_sim_mixed_candidates_rank_policy_samples(tmp_path):
    """candidates=mixed: half of each split's comparisons are the SFT policy's own samples,
    sampled with config.policy_data and ranked by the simulated annotators."""
    _, _, sft, _ = _sim_sft(tmp_path)
    config = config_utils.parse_config_argv([
        "rm", f"--config={ROOT / 'configs' / 'rm_sim.py'}:smoke,candidates=mixed",
        f"--config.workdir={tmp_path / 'rm'}", f"--config.init_from={sft}"])
    summary = rm.run(config)
    data = summary["data"]
    assert data["candidates"] == "mixed"
    for split, n in (("train", 64), ("eval", 32)):
        pol = data[split]["policy"]
        assert pol["examples"] + pol["dropped_identical"] == n // 2
        assert pol["examples"] > 0
        # The world's half plus the policy half that survived: nothing else is lost.
        assert data[split]["comparisons"] == n - n // 2 + pol["examples"]
    n_eval = data["eval"]["comparisons"]
    assert summary["held_out_pairs"] == n_eval * 6  # K = 4 for both halves
    assert "policy" in summary["per_bucket"]
    assert sum(v["pairs"] for v in summary["per_annotator"].values()) == summary["held_out_pairs"]


def test_policy_comparisons_follow_the_sampling_settings(tmp_path):
    from rlhf_jax import evaluation
    from rlhf_jax.data import preferences, sources
    from rlhf_jax.sim.judges import get_judge

    tok, cfg, _, params = _sim_sft(tmp_path)
    prompts = ["the movie was", "i think that", "this place is", "my friend said"]
    source = sources.from_config({"kind": "sim", "seed": 0, "judge": "vader",
                                  "target_agreement": 0.73, "flip_prob": 0.0, "pool": "default"})

    def sample(texts):
        return evaluation.sample_texts(cfg, params, tok, texts, jax.random.key(0),
                                       max_prompt_len=8, max_new_tokens=4, temperature=1.0,
                                       batch_size=8)

    records, stats = preferences.policy_comparisons(source, prompts, sample, k=3, seed=0)
    assert stats["examples"] + stats["dropped_identical"] == len(prompts)
    assert len(records) == stats["examples"] > 0
    for r in records:
        assert r["prompt"] in prompts and len(r["responses"]) == 3
        assert sorted(r["ranks"]) == [0, 1, 2] and r["kinds"] == ["policy"] * 3
        # At most max_new_tokens tokens each (the sampler's setting reached it).
        assert all(len(tok(x, add_special_tokens=False)["input_ids"]) <= 4 for x in r["responses"])
        np.testing.assert_allclose(
            r["gold"], get_judge("vader").score([r["prompt"]] * 3, r["responses"]), atol=1e-6)


def test_rm_hh_smoke(tmp_path):
    hf_dir = tmp_path / "gpt2"
    fast = _tiny_gpt2(hf_dir)
    assert fast.pad_token_id is None  # GPT-2 style: the stage pads with EOS, masks tell them apart
    # Stiennon et al.'s normalisation here (the sim smoke run covers Ziegler's): on real data the
    # preferred responses stand in for demonstrations.
    config = config_utils.parse_config_argv([
        "rm", f"--config={ROOT / 'configs' / 'rm_hh.py'}:smoke,norm=demonstrations",
        f"--config.workdir={tmp_path / 'rm'}", f"--config.init_from=hf:{hf_dir}",
        f"--config.data.source.train=('{FIX / 'hh_rlhf.jsonl'}',)",
        f"--config.data.source.eval=('{FIX / 'hh_rlhf_bad.jsonl'}',)",
        "--config.data.source.skip_bad_rows=True",
        f"--config.data.source.data_dir={tmp_path / 'tfds'}",
        "--config.data.max_len=40",
    ])
    summary = rm.run(config)
    assert summary["step"] == 2
    data = summary["data"]
    assert data["train"]["identical"] == 1 and data["train"]["kept"] == 8
    assert data["eval"]["bad"] == 3 and data["eval"]["kept"] == 2
    assert any("hh_rlhf_bad.jsonl:2" in m for m in data["eval"]["bad_examples"])
    # The multi-turn birthday dialogue does not fit 40 tokens: its prompt was cut from the left.
    assert data["train"]["prompt_truncated"] >= 1
    assert summary["held_out_pairs"] == 2 and summary["gold_ceiling_accuracy"] is None
    cfg, params, meta = _check_final(tmp_path / "rm", summary, "demonstrations")
    # Demonstration normalisation: gain 1, and the chosen responses now average 0.
    assert meta["reward_norm"]["gain"] == 1.0
    from rlhf_jax.data import preference_formats as pf

    recs, _ = pf.parse_file(str(FIX / "hh_rlhf.jsonl"), "hh_rlhf")
    batch, _ = tokenize.encode_sft(fast, [r["prompt"] for r in recs],
                                   [r["responses"][0] for r in recs], 40)
    chosen = rewards.score_sequences(cfg, params, batch["tokens"], batch["mask"], meta["reward_norm"])
    assert abs(float(np.mean(chosen))) < 1e-4


def test_rm_hh_malformed_file_stops_with_file_and_line(tmp_path):
    from rlhf_jax.data.preference_formats import PreferenceDataError

    hf_dir = tmp_path / "gpt2"
    _tiny_gpt2(hf_dir)
    config = config_utils.parse_config_argv([
        "rm", f"--config={ROOT / 'configs' / 'rm_hh.py'}:smoke",
        f"--config.workdir={tmp_path / 'rm'}", f"--config.init_from=hf:{hf_dir}",
        f"--config.data.source.train=('{FIX / 'hh_rlhf_bad.jsonl'}',)",
        f"--config.data.source.eval=('{FIX / 'hh_rlhf.jsonl'}',)",
        f"--config.data.source.data_dir={tmp_path / 'tfds'}",
    ])
    with pytest.raises(PreferenceDataError,
                       match=r"hh_rlhf_bad\.jsonl:2: missing field 'rejected'"):
        rm.run(config)


def test_config_errors_name_the_field(tmp_path):
    config = config_utils.parse_config_argv([
        "rm", f"--config={ROOT / 'configs' / 'rm_sim.py'}:smoke", "--config.loss.kind=hinge"])
    with pytest.raises(ValueError, match="config.loss.kind: 'hinge' is not one of the options"):
        rm.run(config)
    with pytest.raises(ValueError, match="no field .kindd."):
        config_utils.parse_config_argv([
            "rm", f"--config={ROOT / 'configs' / 'rm_sim.py'}:smoke", "--config.loss.kindd=kwise"])
