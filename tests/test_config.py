"""Config flags (real absl parsing), presets and validation before anything compiles."""

import copy

import pytest

from rlhf_jax import config_utils, sharding

TOY = "tests/_toy.py"


def test_base_config_fields_and_lock():
    c = config_utils.base_config()
    for field in ("workdir", "seed", "init_from", "mesh", "sharding_rules", "optim", "train",
                  "distributed"):
        assert field in c
    assert set(c.optim) >= {"lr", "schedule", "warmup_steps", "b1", "b2", "eps", "weight_decay",
                            "grad_clip"}
    assert set(c.train) >= {"steps", "batch_size", "accum_steps", "eval_every", "eval_batches",
                            "ckpt_every", "keep_checkpoints", "log_every"}
    assert set(c.distributed) == {"coordinator_address", "num_processes", "process_id"}
    c.lock()
    with pytest.raises(AttributeError):
        c.optim.lrr = 1.0


def test_overrides_through_absl_flags():
    c = config_utils.parse_config_argv([
        "prog", f"--config={TOY}:steps=3,accum=4", "--config.optim.lr=1e-5",
        "--config.mesh.fsdp=2", "--config.sharding_rules=(('embed', None),)"])
    assert c.train.steps == 3 and c.train.accum_steps == 4
    assert c.optim.lr == 1e-5 and c.mesh.fsdp == 2
    assert dict(sharding.rules_from_config(c))["embed"] is None


@pytest.mark.parametrize("override, needle", [
    ("--config.optim.lrr=1e-5", "lrr"),
    ("--config.optm.lr=1e-5", "optm"),
    ("--config.train.stepz=3", "stepz"),
])
def test_misspelled_override_fails_naming_the_field(override, needle):
    with pytest.raises(ValueError) as e:
        config_utils.parse_config_argv(["prog", f"--config={TOY}", override])
    assert needle in str(e.value) and override in str(e.value)


def test_bad_override_value_and_bad_preset():
    with pytest.raises(ValueError, match="config.optim.lr"):
        config_utils.parse_config_argv(["prog", f"--config={TOY}", "--config.optim.lr=fast"])
    with pytest.raises(ValueError, match=r"unknown preset key\(s\) \['stepz'\]"):
        config_utils.parse_config_argv(["prog", f"--config={TOY}:stepz=3"])


def test_parse_preset():
    assert config_utils.parse_preset("model=small,steps=10,lr=1e-3,dry=true,x=none") == {
        "model": "small", "steps": 10, "lr": 1e-3, "dry": True, "x": None}
    assert config_utils.parse_preset("small") == {"preset": "small"}
    assert config_utils.parse_preset("") == {}
    with pytest.raises(ValueError, match="'steps' is not key=value"):
        config_utils.parse_preset("model=small,steps")
    with pytest.raises(ValueError, match="given twice"):
        config_utils.parse_preset("a=1,a=2")


def _toy_config(**train):
    from tests import _toy

    c = copy.deepcopy(_toy.get_config())
    with c.unlocked():
        c.train.update(train)
    return c


@pytest.mark.parametrize("change, needle", [
    (dict(batch_size=10, accum_steps=4), "config.train.batch_size: 10 is not divisible by "
                                         "config.train.accum_steps=4"),
    (dict(batch_size=16, accum_steps=4), "multiple of 32"),  # 4-row microbatches over 8 shards
    (dict(steps=0), "config.train.steps: 0"),
    (dict(ckpt_every=-1), "config.train.ckpt_every: -1"),
])
def test_validate_names_the_field(change, needle):
    with pytest.raises(ValueError) as e:
        config_utils.validate(_toy_config(**change), n_devices=8)
    assert needle in str(e.value)


def test_validate_optim_and_mesh_fields():
    c = _toy_config()
    config_utils.validate(c, 8)  # the toy config itself is valid
    c.optim.schedule = "cosin"
    with pytest.raises(ValueError, match="config.optim.schedule: 'cosin'"):
        config_utils.validate(c, 8)
    c = _toy_config()
    c.mesh.data = 3
    with pytest.raises(ValueError, match=r"config.mesh.data.*8 available devices"):
        config_utils.validate(c, 8)
    c = _toy_config()
    c.sharding_rules = (("embed", "fspd"),)
    with pytest.raises(ValueError, match=r"config.sharding_rules\[0\].*'fspd'"):
        config_utils.validate(c, 8)


def test_trainer_rejects_a_bad_mesh_before_doing_any_work(tmp_path):
    from rlhf_jax.trainer import Trainer

    c = _toy_config()
    c.workdir = str(tmp_path / "run")
    c.mesh.data = 3
    with pytest.raises(ValueError, match="config.mesh.data"):
        Trainer(c, "toy")
    assert not (tmp_path / "run").exists()  # nothing written, nothing compiled


def test_save_config_roundtrip(tmp_path):
    import json

    c = _toy_config()
    path = config_utils.save_config(c, tmp_path)
    assert json.loads(path.read_text())["train"]["batch_size"] == c.train.batch_size


def test_entry_point_exits_2_on_a_misspelled_override(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, TOY, f"--config={TOY}", f"--config.workdir={tmp_path / 'run'}",
         "--config.train.batch_szie=4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert ("--config.train.batch_szie=4: config.train has no field 'batch_szie'; did you mean "
            "'batch_size'?") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module, config", [
    ("rlhf_jax.sft", "configs/sft_sim.py"),
    ("rlhf_jax.rm", "configs/rm_sim.py"),
    ("rlhf_jax.ppo", "configs/ppo_sim.py"),
    ("experiments.pipeline", "configs/pipeline_sim.py"),
])
def test_every_stage_entry_point_exits_2_naming_a_misspelled_field(module, config, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", module, f"--config={config}", f"--config.workdir={tmp_path / 'run'}",
         "--config.seedd=1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "--config.seedd=1: config has no field 'seedd'; did you mean 'seed'?" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
