"""Checks before anything trains (issue 26): fields a run would ignore, values only read at the
end of a run, one error surface (`error:` + one line, exit 2, no usage dump), and a refused
run leaving no work dir behind. Everything here is in-process and compiles nothing."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf_jax import config_utils, errors, validation
from rlhf_jax.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def _parse(config: str, *overrides: str):
    return config_utils.parse_config_argv(
        ["prog", f"--config={ROOT / 'configs' / config}", *overrides])


# ------------------------------------------------------------- fields the run would ignore


@pytest.mark.parametrize("config,override,names", [
    # rm_sim / dpo_sim train for train.epochs > 0 over the data: steps are computed.
    ("rm_sim.py", "--config.train.steps=20", ("train.steps=20", "config.train.epochs=1.0",
                                              "--config.train.epochs=0")),
    ("dpo_sim.py", "--config.train.steps=20", ("train.steps=20", "config.train.epochs=1.0")),
    # ... also inside the pipeline's stage blocks.
    ("pipeline_sim.py:tiny", "--config.rm.train.steps=20",
     ("--config.rm.train.steps=20", "config.rm.train.epochs=2.0", "--config.rm.train.epochs=0")),
    ("ppo_sim.py", "--config.kl.loss_estimator=k2", ("kl.loss_estimator", "config.kl.mode")),
    ("ppo_sim.py:smoke", "--config.optim.end_lr_ratio=0.1",
     ("optim.end_lr_ratio", "config.optim.schedule='constant'")),
    ("pg_sim.py:method=rloo", "--config.rollout.eos_trick=False", None),  # the decider alone
])
def test_a_field_another_field_overrides_is_refused(config, override, names):
    if names is None:
        _parse(config, override)
        return
    with pytest.raises(UserError) as info:
        _parse(config, override)
    line = info.value.line()
    assert "is ignored" in line and "\n" not in line
    for name in names:
        assert name in line, line


def test_conflicting_fields_pass_once_the_decider_agrees():
    c = _parse("rm_sim.py", "--config.train.steps=20", "--config.train.epochs=0")
    assert c.train.steps == 20 and c.train.epochs == 0
    c = _parse("ppo_sim.py", "--config.kl.loss_estimator=k2", "--config.kl.mode=loss")
    assert c.kl.loss_estimator == "k2"
    _parse("ppo_sim.py", "--config.kl.adaptive=True", "--config.kl.target=3.0")
    with pytest.raises(UserError, match=r"kl\.target=3\.0: is ignored: config\.kl\.adaptive"):
        _parse("ppo_sim.py", "--config.kl.adaptive=False", "--config.kl.target=3.0")


def test_conflict_rules_name_real_fields_of_shipped_configs():
    """Every rule's field and decider exist side by side in some shipped config (a rule that
    matches nothing would guard nothing)."""
    import importlib

    configs = [importlib.import_module(f"configs.{n}").get_config()
               for n in ("rm_sim", "dpo_sim", "ppo_sim", "pg_sim", "pipeline_sim")]
    for rule in validation.CONFLICTS:
        assert any(validation._lookup(c, rule.field) is not validation._MISSING
                   and validation._lookup(c, rule.decider) is not validation._MISSING
                   for c in configs), rule


# ------------------------------------------------------- values read only at the end


def test_best_of_n_sizes_and_prompt_counts():
    validation.check_best_of_n(16)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(UserError, match="config.bon.n"):
            validation.check_best_of_n(bad, "config.bon.n")
    src = config_utils.sim_source(seed=0, num_train=0, num_eval=128)
    assert validation.check_prompt_count(128, src) == 128
    with pytest.raises(UserError) as info:
        validation.check_prompt_count(300, src)
    assert info.value.line() == (
        "config.eval.num_prompts: 300 is more than the 128 held-out prompts of "
        "config.eval.prompts; set it <= 128, or raise config.eval.prompts.num_eval")


def test_pipeline_comparison_block_is_checked_before_the_stages():
    """`validation.check_comparison` on the pipeline's own config (experiments.pipeline calls
    it from its `validate`): best-of-n's n only when bon runs, prompts against the data."""
    ok = _parse("pipeline_sim.py:tiny", "--config.methods=ppo,bon")
    validation.check_comparison(ok, ["ppo", "bon"])
    bad_n = _parse("pipeline_sim.py:tiny", "--config.methods=bon", "--config.bon.n=0")
    with pytest.raises(UserError, match=r"^config\.bon\.n: 0 must be an int >= 1"):
        validation.check_comparison(bad_n, ["bon"])
    validation.check_comparison(bad_n, ["ppo"])  # n is not read without bon
    many = _parse("pipeline_sim.py:tiny", "--config.eval.num_prompts=300")
    with pytest.raises(UserError, match=r"300 is more than the 128 held-out prompts"):
        validation.check_comparison(many, ["ppo"])


def test_best_of_n_refuses_before_training(tmp_path, monkeypatch):
    """`experiments.best_of_n --config.n=0` (and a prompt count above the data's) fails before
    any stage runs, and leaves no work dir."""
    from experiments import best_of_n, pipeline

    def train(*a, **k):
        raise AssertionError("a stage started before the config was checked")

    monkeypatch.setattr(pipeline, "base_stages", train)
    work = tmp_path / "bon"
    for override, match in [("--config.n=0", r"^config\.n: 0 must be an int >= 1"),
                            ("--config.num_prompts=300",
                             r"^config\.num_prompts: 300 is more than the 128"),
                            ("--config.eval.gold=oracle", r"^config\.eval\.gold")]:
        config = _parse("best_of_n_sim.py:tiny", f"--config.workdir={work}", override)
        with pytest.raises(UserError, match=match):
            best_of_n.run(config)
        assert not work.exists()


# ------------------------------------------------------------------- one error surface


def test_misspelt_sweep_flag_is_one_line_without_usage(capsys):
    from rlhf_jax.sweep import cli

    rc = cli.main([f"--config={ROOT / 'configs' / 'ppo_sim.py'}", "--wrokers=2"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.splitlines() == ["error: --wrokers=2: is not a flag of python -m rlhf_jax.sweep; "
                                "did you mean --workers? see python -m rlhf_jax.sweep --help"]
    rc = cli.main(["--config=x.py", "--backend=gke"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert "usage:" not in err and "invalid choice: 'gke'" in err


def test_convert_usage_error_is_one_line(capsys):
    from rlhf_jax import convert

    assert convert.main(["hf-to-orbax", "--src", "x"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == ["error: python -m rlhf_jax.convert hf-to-orbax: the following "
                                "arguments are required: --dst; see python -m rlhf_jax.convert "
                                "hf-to-orbax --help"]


# Files that still print another prefix; the lead rewires them at merge (then empty this).
OTHER_PREFIX_PENDING: set[str] = set()


def test_every_entry_point_prints_the_same_error_prefix():
    found = set()
    for path in [*ROOT.glob("rlhf_jax/**/*.py"), *ROOT.glob("experiments/*.py")]:
        text = path.read_text()
        if re.search(r"""["']config error:""", text) or "argparse.ArgumentParser(" in text \
                and path.name not in ("errors.py", "stats.py"):
            found.add(str(path.relative_to(ROOT)))
    assert found == OTHER_PREFIX_PENDING


def test_a_refused_run_leaves_no_empty_work_dir(tmp_path, capsys):
    config = ROOT / "configs" / "sft_sim.py"

    def refused(c):
        Path(c.workdir, "checkpoints").mkdir(parents=True)  # made, then refused
        raise UserError("config.bon.n", "0 must be an int >= 1")

    work = tmp_path / "new"
    with pytest.raises(SystemExit) as info:
        config_utils.run_with_config(refused, argv=["prog", f"--config={config}:smoke",
                                                    f"--config.workdir={work}"])
    assert info.value.code == errors.EXIT_USER_ERROR and not work.exists()
    assert capsys.readouterr().err.endswith("error: config.bon.n: 0 must be an int >= 1\n")

    def wrote(c):
        Path(c.workdir).mkdir(parents=True)
        Path(c.workdir, "config.json").write_text("{}")
        raise UserError("config.x", "bad")

    with pytest.raises(SystemExit):  # a dir with a file in it is not ours to delete
        config_utils.run_with_config(wrote, argv=["prog", f"--config={config}:smoke",
                                                  f"--config.workdir={work}"])
    assert (work / "config.json").exists()
    existing = tmp_path / "old"
    existing.mkdir()
    with pytest.raises(SystemExit):  # nor is a dir that was there before the run
        config_utils.run_with_config(lambda c: (_ for _ in ()).throw(UserError("a", "b")),
                                     argv=["prog", f"--config={config}:smoke",
                                           f"--config.workdir={existing}"])
    assert existing.is_dir()


# ------------------------------------------- checks wired into the pipeline and weak-to-strong



def test_pipeline_validate_checks_the_comparison_block():
    from experiments import pipeline

    bad_n = _parse("pipeline_sim.py:tiny", "--config.methods=ppo,bon", "--config.bon.n=0")
    with pytest.raises(UserError, match=r"^config\.bon\.n: 0"):
        pipeline.validate(bad_n)
    many = _parse("pipeline_sim.py:tiny", "--config.eval.num_prompts=300")
    with pytest.raises(UserError, match=r"^config\.eval\.num_prompts: 300 is more than"):
        pipeline.validate(many)


def test_weak_to_strong_bad_flag_is_a_one_line_user_error(capsys):
    from experiments import weak_to_strong

    for bad in ("--runner=bogus", "--workers=two"):
        assert weak_to_strong.main(["prog", bad]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"error: {bad.split('=')[0]}")


def test_weak_to_strong_honours_config_workdir(tmp_path, monkeypatch):
    from experiments import lib, weak_to_strong

    seen = {}

    class Stop(Exception):
        pass

    def run_trials(trials, out, workers):
        seen["dirs"] = [str(out), *(str(t.workdir) for t in trials)]
        raise Stop

    monkeypatch.setattr(lib, "run_trials", run_trials)
    with pytest.raises(Stop):
        weak_to_strong.run(["prog", f"--config={ROOT / 'configs' / 'w2s_sim.py'}:tiny",
                            "--no_compile_cache", f"--config.workdir={tmp_path / 'mine'}"])
    assert seen["dirs"] and all(d.startswith(str(tmp_path / "mine")) for d in seen["dirs"])
