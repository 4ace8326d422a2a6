"""Sweeps: definitions, override round trips, the local pool, resume, SLURM (submitit) and dry runs.

Trials that train run `tests/_toy.py` (a few seconds each); trials whose program does not matter
(round trips, pinning, submitit) run `tests/_sweep_echo.py`, which starts without JAX.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rlhf_jax import metrics, runcache
from rlhf_jax.errors import UserError
from rlhf_jax.sweep import cli, define, local
from rlhf_jax.sweep import chainit, fixed, product, sweep, zipit

# submitit's import runs logging.config.dictConfig, which closes every existing handler; absl's
# handler then closes the stream it holds, here a pytest capture that is no longer sys.stderr.
os.environ.setdefault("SUBMITIT_LOG_LEVEL", "NOCONFIG")

REPO = Path(__file__).resolve().parents[1]
TOY = REPO / "tests" / "_toy.py"
ECHO = REPO / "tests" / "_sweep_echo.py"
TOY_ARG = "steps=6,ckpt_every=2"


def _sweep_file(path: Path, config_from: Path, trials: list[dict], entry: Path | None) -> Path:
    """A config file whose get_config is `config_from`'s and whose get_sweep returns `trials`."""
    path.write_text(
        "import importlib.util\n"
        f"_spec = importlib.util.spec_from_file_location('_base_for_sweep', {str(config_from)!r})\n"
        "_base = importlib.util.module_from_spec(_spec)\n"
        "_spec.loader.exec_module(_base)\n"
        "get_config = _base.get_config\n"
        + (f"ENTRY = {str(entry)!r}\n" if entry else "")
        + f"def get_sweep(arg=None):\n    return {trials!r}\n")
    return path


# ------------------------------------------------------------------------------ definitions


def test_helpers_build_override_lists():
    assert sweep("seed", range(2)) == [{"seed": 0}, {"seed": 1}]
    grid = product(sweep("config.kl.beta", [0.1, 0.3]), fixed("kl.adaptive", False),
                   sweep("seed", [0, 1]))
    assert grid == [{"kl.beta": b, "kl.adaptive": False, "seed": s}
                    for b in (0.1, 0.3) for s in (0, 1)]  # first factor varies slowest
    assert product([sweep("a", [1, 2]), sweep("b", [3])]) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
    assert zipit(sweep("a", [1, 2]), sweep("b", [3, 4])) == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
    assert chainit(sweep("a", [1]), [{"b": 2}, {}]) == [{"a": 1}, {"b": 2}, {}]
    with pytest.raises(UserError, match="'a' is set by two"):
        product(sweep("a", [1]), sweep("a", [2]))
    with pytest.raises(UserError, match=r"different lengths \[1, 2\]"):
        zipit(sweep("a", [1]), sweep("b", [1, 2]))
    with pytest.raises(UserError, match="cannot be swept"):
        sweep("workdir", ["x"])
    with pytest.raises(UserError, match="not a dotted field path"):
        sweep("kl beta", [1])


TRICKY = [
    {"name": "a b"}, {"name": ""}, {"name": "true"}, {"name": "x,y=z"}, {"name": "--dash"},
    {"name": "quote'\"s", "lr": 0.1}, {"tags": ()}, {"tags": ("one",)},
    {"tags": ("p,q", "r s"), "shape": (4,)}, {"count": -3, "flag": True},
    {"count": 7, "lr": 1e-7, "flag": False}, {"lr": 3}, {"nested.label": "n=1"},
    {"nested": {"depth": 2, "label": "y"}}, {"fail": True},
]


def test_override_values_read_back_in_the_children_and_workers_are_pinned(tmp_path):
    """Strings, empty strings, bools, ints, floats, tuples and sub-dicts reach each child's
    absl/ml_collections parser exactly; each child runs on its worker's cores only; a failing
    trial is reported with its log and the CLI exits 1."""
    config = _sweep_file(tmp_path / "echo_sweep.py", ECHO, TRICKY, ECHO)
    cores = sorted(os.sched_getaffinity(0))
    workers = min(2, len(cores))
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.sweep", f"--config={config}", f"--workers={workers}",
         f"--workdir={tmp_path / 'sweep'}", "--devices=cpu"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "sweep" / "results.jsonl").open()]
    assert [r["overrides"] for r in rows] == json.loads(json.dumps(TRICKY))
    assert [r["status"] for r in rows] == ["done"] * (len(TRICKY) - 1) + ["failed"]
    failed = rows[-1]
    assert failed["returncode"] == 3 and "failing as asked" in Path(failed["log"]).read_text()
    assert f"FAILED     {failed['trial']}: exit status 3; log: {failed['log']}" in proc.stdout

    base = define.resolve(str(ECHO), None)[0].to_dict()
    slots = {s.cpus for s in local.cpu_slots(workers)}
    for trial, row in zip(TRICKY[:-1], rows[:-1]):
        got = json.loads((Path(row["workdir"]) / "summary.json").read_text())
        want = json.loads(json.dumps(base))
        for path, value in trial.items():
            *parents, leaf = path.split(".")
            node = want
            for p in parents:
                node = node[p]
            node[leaf] = value
        want["workdir"] = row["workdir"]
        assert got["config"] == json.loads(json.dumps(want)), trial
        assert tuple(got["affinity"]) in slots
        assert got["env"]["OMP_NUM_THREADS"] == str(len(got["affinity"]))
        assert row["summary.score"] == pytest.approx(got["score"])
    assert isinstance(rows[-2]["config.nested"], dict)
    # The CSV holds the same rows, non-scalars as JSON.
    csv_lines = (tmp_path / "sweep" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == len(TRICKY) + 1 and csv_lines[0].startswith("trial,key,status")


def test_bad_sweeps_are_one_line_user_errors(tmp_path, capsys):
    sweep_dir = str(tmp_path / "s")
    with pytest.raises(UserError, match=r"trial 0 .*--config.count.*invalid literal.*abc"):
        define.expand(str(ECHO), None, [{"count": "abc"}], workdir=sweep_dir, entry=str(ECHO))
    with pytest.raises(UserError, match="has no field 'lrr'"):
        define.expand(str(ECHO), None, [{"lrr": 1.0}], workdir=sweep_dir, entry=str(ECHO))
    with pytest.raises(UserError, match="resolves to the same config as trial 0"):
        define.expand(str(ECHO), None, [{"count": 1}, {}], workdir=sweep_dir, entry=str(ECHO))
    with pytest.raises(UserError, match="names no program"):
        define.expand(str(ECHO), None, [{}], workdir=sweep_dir)
    with pytest.raises(UserError, match="both given to the sweep and swept"):
        define.expand(str(ECHO), None, [{"count": 2}], workdir=sweep_dir, entry=str(ECHO),
                      base_args=["--config.count=3"])
    assert cli.main([f"--config={ECHO}", f"--entry={ECHO}", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: {ECHO}: defines no get_sweep(arg); add one returning a list of "
                   "override dicts, e.g. product(sweep('seed', range(3)))")
    too_many = len(os.sched_getaffinity(0)) + 1
    with pytest.raises(UserError, match=f"{too_many} workers but this process may use only"):
        local.local_slots(too_many, "cpu")


def test_a_trial_another_runner_holds_is_left_alone(tmp_path):
    trial = define.expand(str(ECHO), None, [{}], workdir=tmp_path, entry=str(ECHO))[0]
    Path(trial.workdir).mkdir(parents=True)
    with runcache.lock(trial.workdir, wait=False) as mine:
        assert mine
        row = local.run_trial(trial)
    assert row["status"] == "busy" and not (Path(trial.workdir) / "summary.json").exists()
    assert local.run_trial(trial)["status"] == "done"
    assert local.run_trial(trial)["status"] == "skipped"


def test_worker_slots_split_cores_gpus_and_tpu_chips():
    assert [s.cpus for s in local.cpu_slots(3, range(8))] == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert local.cpu_slots(3, range(8))[2].env["OMP_NUM_THREADS"] == "2"
    gpus = local.accelerator_slots("gpu", ["0", "1", "2", "3"], 2, None)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["0,1", "2,3"]
    chips = local.accelerator_slots("tpu", ["0", "1", "2", "3"], 1, None)
    assert [s.env["TPU_VISIBLE_CHIPS"] for s in chips] == ["0", "1", "2", "3"]
    assert len({s.env["TPU_MESH_CONTROLLER_PORT"] for s in chips}) == 4
    assert chips[0].env["TPU_CHIPS_PER_PROCESS_BOUNDS"] == "1,1,1"
    with pytest.raises(UserError, match="do not fit the 4 gpu"):
        local.accelerator_slots("gpu", ["0", "1", "2", "3"], 2, 3)


def test_shipped_ppo_sim_sweep_resolves(tmp_path):
    trials = define.expand("configs/ppo_sim.py", "smoke", workdir=tmp_path,
                           base_args=["--config.init_from=runs/sft",
                                      "--config.reward_from=runs/rm"])
    assert len(trials) == 9 and len({t.key for t in trials}) == 9
    assert {t.entry for t in trials} == {"rlhf_jax.ppo"}
    for t in trials:
        config, _ = define.resolve("configs/ppo_sim.py", "smoke", t.args[1:3], t.overrides)
        assert config.kl.adaptive is False and config.kl.beta == t.overrides["kl.beta"]
        assert config.seed == t.overrides["seed"] and config.init_from == "runs/sft"
        assert t.command()[1:3] == ["-m", "rlhf_jax.ppo"]
        assert t.args[-1] == f"--config.workdir={tmp_path / t.name}"
    assert {t.overrides["kl.beta"] for t in trials} == {0.03, 0.1, 0.3}


# ------------------------------------------------------------------------ the local pool


TOY_TRIALS = [{"seed": 1}, {"seed": 2}, {"optim.lr": 0.01}]
BAD_TRIAL = {"train.batch_size": 15}  # not divisible by accum_steps=2: fails in validation


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory):
    """First call: 3 toy trials and a failing one, 2 workers, through the CLI entry."""
    tmp = tmp_path_factory.mktemp("toy_sweep")
    config = _sweep_file(tmp / "toy_sweep.py", TOY, TOY_TRIALS + [BAD_TRIAL], TOY)
    argv = [f"--config={config}:{TOY_ARG}", f"--workdir={tmp / 'sweep'}", "--workers=2",
            "--devices=cpu", "--no-progress"]
    if len(os.sched_getaffinity(0)) < 2:
        argv.append("--no-pin")
    code = cli.main(argv)
    rows = [json.loads(line) for line in (tmp / "sweep" / "results.jsonl").open()]
    return argv, code, rows


def test_local_runner_runs_trials_isolates_a_failure_and_skips_finished_ones(toy_sweep, capsys):
    argv, code, rows = toy_sweep
    assert code == 1
    assert [r["status"] for r in rows] == ["done", "done", "done", "failed"]
    assert [r["overrides"] for r in rows] == TOY_TRIALS + [BAD_TRIAL]
    for r in rows[:3]:
        assert r["summary.step"] == 6 and np.isfinite(r["summary.final.loss"])
        assert json.loads((Path(r["workdir"]) / "sweep_trial.json").read_text())["key"] == r["key"]
    assert rows[0]["summary.final.loss"] != rows[1]["summary.final.loss"]  # seeds differ
    assert "not divisible" in Path(rows[3]["log"]).read_text()

    before = {r["trial"]: os.stat(Path(r["workdir"]) / "summary.json").st_mtime_ns
              for r in rows[:3]}
    assert cli.main(argv) == 1  # the failing trial runs (and fails) again; the others do not
    again = [json.loads(line) for line in (Path(rows[0]["workdir"]).parent /
                                           "results.jsonl").open()]
    assert [r["status"] for r in again] == ["skipped", "skipped", "skipped", "failed"]
    for r, old in zip(again[:3], rows[:3]):
        assert r["summary.final.loss"] == old["summary.final.loss"]
        assert os.stat(Path(r["workdir"]) / "summary.json").st_mtime_ns == before[r["trial"]]
    assert Path(rows[3]["log"]).read_text().count("=== failed") == 2
    assert "3 of 4 trials finished earlier: skipped" in capsys.readouterr().err


def test_killed_trial_resumes_to_the_uninterrupted_result(toy_sweep, tmp_path, monkeypatch):
    """SIGKILL mid-run → failed; rerun, SIGTERM → exit 0 but no summary → incomplete;
    rerun → done, with the same metrics history as the uninterrupted trial of the same config."""
    _, _, rows = toy_sweep
    trials = define.expand(f"{TOY}", TOY_ARG, [TOY_TRIALS[0]], workdir=tmp_path, entry=str(TOY))
    assert trials[0].key == rows[0]["key"]  # same resolved config, another sweep dir
    slots = local.local_slots(1, "cpu")

    monkeypatch.setenv("TOY_SIGKILL_BEFORE_STEP", "5")
    first = local.run_pool(trials, slots, tmp_path, progress=False)[0]
    assert first["status"] == "failed" and first["returncode"] == -9
    assert "killed by SIGKILL" in Path(first["log"]).read_text()
    assert sorted(p.name for p in (tmp_path / trials[0].name / "checkpoints").iterdir())

    monkeypatch.delenv("TOY_SIGKILL_BEFORE_STEP")
    monkeypatch.setenv("TOY_SIGTERM_BEFORE_STEP", "5")
    second = local.run_pool(trials, slots, tmp_path, progress=False)[0]
    assert second["status"] == "incomplete" and second["returncode"] == 0

    monkeypatch.delenv("TOY_SIGTERM_BEFORE_STEP")
    third = local.run_pool(trials, slots, tmp_path, progress=False)[0]
    assert third["status"] == "done"
    got = metrics.read_metrics(third["workdir"])
    want = metrics.read_metrics(rows[0]["workdir"])
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in w:
            if k != "steps_per_sec":
                np.testing.assert_allclose(g[k], w[k], rtol=1e-5, err_msg=f"{k} step {w['step']}")
    assert third["summary.final.loss"] == pytest.approx(rows[0]["summary.final.loss"], rel=1e-5)
    assert local.run_pool(trials, slots, tmp_path, progress=False)[0]["status"] == "skipped"


# ----------------------------------------------------------------------- SLURM and TPU pods


def test_submitit_local_executor_runs_the_job_array(tmp_path, capsys):
    submitit = pytest.importorskip("submitit")
    config = _sweep_file(tmp_path / "echo_sweep.py", ECHO, [{"count": 2}, {"count": 3}], ECHO)
    sweep_dir = tmp_path / "sweep"
    executor = submitit.LocalExecutor(folder=tmp_path / "submitit")
    executor.update_parameters(timeout_min=10)
    argv = [f"--config={config}", f"--workdir={sweep_dir}", "--backend=slurm", "--wait",
            "--no-progress"]
    assert cli.run(argv, slurm_executor=executor) == 0
    rows = [json.loads(line) for line in (sweep_dir / "results.jsonl").open()]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert [r["summary.config.count"] for r in rows] == [2, 3]
    assert "submitted job array" in capsys.readouterr().out
    # A second call submits nothing.
    assert cli.run(argv, slurm_executor=executor) == 0
    assert [json.loads(line)["status"] for line in (sweep_dir / "results.jsonl").open()] == [
        "skipped", "skipped"]
    assert "submitted" not in capsys.readouterr().out


def test_dry_runs_print_what_they_would_launch(tmp_path, capsys):
    pytest.importorskip("submitit")
    config = _sweep_file(tmp_path / "echo_sweep.py", ECHO, TRICKY[:4], ECHO)
    sweep_dir = tmp_path / "sweep"
    trials = define.expand(str(config), None, workdir=sweep_dir)

    assert cli.main([f"--config={config}", f"--workdir={sweep_dir}", "--backend=slurm",
                     "--dry-run", "--partition=gpu", "--workers=3", "--gpus-per-node=1",
                     "--time=30", "--slurm-setup=module load cuda"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/bin/bash")
    for line in ("#SBATCH --array=0-3%3", "#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1",
                 "#SBATCH --time=30", "#SBATCH --job-name=sweep-sweep", "module load cuda"):
        assert line in out.splitlines(), line
    assert "-u -m submitit.core._submit" in out
    commands = [line.split(": ", 1)[1] for line in out.splitlines() if line.startswith("#   [")]
    assert [shlex.split(c) for c in commands] == [t.command() for t in trials]

    assert cli.main([f"--config={config}", f"--workdir={sweep_dir}", "--backend=tpu-pod",
                     "--dry-run", "--tpu=my-pod", "--zone=us-central2-b"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("#")]
    assert len(lines) == len(trials)
    for line, t in zip(lines, trials):
        argv = shlex.split(line)
        assert argv[:8] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod",
                            "--zone=us-central2-b", "--worker=all"]
        remote = shlex.split(argv[8].removeprefix("--command="))
        assert remote == ["cd", "rlhf_jax", "&&", *t.command("python3")]

    assert cli.main([f"--config={config}", f"--workdir={sweep_dir}", "--dry-run",
                     "--devices=cpu", "--no-pin"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("#")]
    assert [shlex.split(x) for x in lines] == [t.command() for t in trials]
    assert cli.main([f"--config={config}", "--workdir=relative/dir", "--backend=tpu-pod",
                     "--dry-run", "--tpu=p", "--zone=z"]) == 2
    assert "is relative" in capsys.readouterr().err
    assert not sweep_dir.exists()  # dry runs write nothing
