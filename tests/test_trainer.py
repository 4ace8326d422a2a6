"""The shared loop: accumulation math, schedules, resume after SIGKILL/SIGTERM, non-finite stop."""

import copy
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax import checkpoint, metrics, optim
from rlhf_jax import trainer as tr
from rlhf_jax.data.iterators import ArrayIterator
from tests import _toy

STEPS = 8


def _config(workdir, **train):
    c = copy.deepcopy(_toy.get_config(f"steps={STEPS}"))
    with c.unlocked():
        c.workdir = str(workdir)
        c.train.update(train)
    return c


def _train_records(workdir):
    return [r for r in metrics.read_metrics(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted toy run (8 steps, ckpt every 2, eval every 4), in this process."""
    workdir = tmp_path_factory.mktemp("reference")
    summary = _toy.run(_config(workdir))
    return workdir, metrics.read_metrics(workdir), summary


def _run_toy_subprocess(workdir, **env):
    full_env = dict(os.environ, **{k: str(v) for k, v in env.items()})
    return subprocess.run(
        [sys.executable, "tests/_toy.py", f"--config=tests/_toy.py:steps={STEPS}",
         f"--config.workdir={workdir}"],
        env=full_env, capture_output=True, text=True, timeout=300)


def _assert_same_history(got, want):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert sorted(g) == sorted(w)
        for key in g:
            if key not in ("steps_per_sec",):
                np.testing.assert_allclose(g[key], w[key], rtol=1e-6, err_msg=f"{key} step "
                                                                              f"{g['step']}")


# ------------------------------------------------------------------------------- pure pieces


def test_schedules_and_reported_lr():
    cfg = _toy.get_config().optim
    with cfg.unlocked():
        cfg.update(dict(lr=1.0, warmup_steps=2, end_lr_ratio=0.1))
    cos = optim.make_schedule(cfg, 10)
    np.testing.assert_allclose(cos(np.array([0, 1, 2, 10])), [0.0, 0.5, 1.0, 0.1], atol=1e-6)
    cfg.schedule = "linear"
    lin = optim.make_schedule(cfg, 10)
    np.testing.assert_allclose(lin(np.array([1, 2, 6, 10])), [0.5, 1.0, 0.55, 0.1], atol=1e-6)
    cfg.schedule = "constant"
    const = optim.make_schedule(cfg, 10)
    np.testing.assert_allclose(const(np.array([1, 2, 9])), [0.5, 1.0, 1.0], atol=1e-6)

    # The step reports the lr of the update it made, and the global-norm clip applies.
    cfg.grad_clip = 1e-3
    opt = optim.make_optimizer(cfg, 10)
    params = _toy.init_params(jax.random.key(0))
    state = tr.TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params))
    step = jax.jit(tr.make_train_step(_toy.loss_fn, opt))
    batch = {k: v[:8] for k, v in _toy.make_data().items()}
    lrs = []
    for i in range(3):
        state, m = step(state, None, batch, jax.random.key(i))
        lrs.append(float(m["lr"]))
    np.testing.assert_allclose(lrs, [0.0, 0.5, 1.0], atol=1e-6)
    assert float(m["grad_norm"]) > 1e-3  # reported before clipping
    assert int(state.step) == 3


def test_grad_accumulation_with_ragged_microbatches_matches_one_big_batch():
    data = _toy.make_data(n=16, seed=4)
    # Rows with very different target counts: with k=4 the microbatches (rows i, i+4, ...) hold
    # 4 / 16 / 28 / 28 target tokens, so averaging per-microbatch means would be wrong.
    lengths = np.array([1, 2, 8, 8] * 4)
    data["loss_mask"] = (np.arange(_toy.LENGTH)[None] <= lengths[:, None]).astype(np.int32)
    opt = optax.sgd(1.0)  # plain SGD exposes any mis-weighting of the gradient
    params = _toy.init_params(jax.random.key(1))
    state = tr.TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params))
    outs = {}
    for k in (1, 4):
        outs[k] = jax.jit(tr.make_train_step(_toy.loss_fn, opt, accum_steps=k))(
            state, None, data, jax.random.key(0))
    for a, b in zip(jax.tree.leaves(outs[1][0].params), jax.tree.leaves(outs[4][0].params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for key in ("loss", "accuracy", "count", "grad_norm"):
        np.testing.assert_allclose(outs[1][1][key], outs[4][1][key], rtol=1e-5)
    assert float(outs[4][1]["count"]) == float(np.sum(data["loss_mask"][:, 1:]))

    # The naive alternative (mean of per-microbatch mean gradients) differs measurably here.
    def mean_loss(p, mb):
        loss, sums = _toy.loss_fn(p, None, mb, jax.random.key(0))
        return loss / sums["count"]

    grad = jax.jit(jax.grad(mean_loss))
    mbs = tr.split_microbatches(data, 4)
    naive = jax.tree.map(lambda *g: sum(g) / 4, *[
        grad(params, jax.tree.map(lambda x: x[i], mbs)) for i in range(4)])
    exact = grad(params, data)
    assert not np.allclose(naive["up"]["kernel"], exact["up"]["kernel"], rtol=1e-3)


def test_missing_count_is_a_clear_error():
    opt = optax.sgd(1.0)
    params = _toy.init_params(jax.random.key(1))
    state = tr.TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params))
    step = tr.make_train_step(lambda p, f, b, r: (_toy.loss_fn(p, f, b, r)[0], {}), opt)
    with pytest.raises(KeyError, match="'count'"):
        step(state, None, {k: v[:4] for k, v in _toy.make_data().items()}, jax.random.key(0))


def test_metric_writer_only_on_main_process_and_truncates_on_resume(tmp_path):
    w = metrics.MetricWriter(tmp_path, enabled=False)
    w.write(1, {"loss": 1.0})
    w.write_summary({"a": 1})
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "summary.json").exists()
    w = metrics.MetricWriter(tmp_path, enabled=True)
    for s in (1, 2, 3):
        w.write(s, {"loss": jnp.float32(s), "nan": float("nan")})
    w.close()
    assert any((tmp_path / "tensorboard").iterdir())
    w = metrics.MetricWriter(tmp_path, resume_step=2, enabled=True)  # checkpoint was at 2
    w.write(3, {"loss": 30.0})
    w.close()
    recs = metrics.read_metrics(tmp_path)
    assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert recs[0]["nan"] == "nan"


# ----------------------------------------------------------------------------- the full loop


def test_reference_run_outputs(reference):
    workdir, records, summary = reference
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert [r["step"] for r in evals] == [4, 8]
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert set(train[0]) >= {"loss", "accuracy", "count", "grad_norm", "lr", "steps_per_sec"}
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk["step"] == STEPS and on_disk["final"]["loss"] == train[-1]["loss"]
    assert on_disk["eval"]["loss"] == evals[-1]["eval/loss"] == summary["eval"]["loss"]
    assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == STEPS
    ckpt = checkpoint.Checkpointer(workdir)
    assert ckpt.all_steps() == [6, 8]  # keep_checkpoints=2
    meta = ckpt.restore_metadata()
    ckpt.close()
    assert meta["model"] == {"vocab": 32, "embed": 16, "mlp": 32} and meta["stage"] == "toy"
    assert checkpoint.stage_is_complete(workdir)
    params, final_meta = checkpoint.load_stage_params(workdir)
    assert final_meta["step"] == STEPS and jax.tree.structure(params) == jax.tree.structure(
        _toy.init_params(jax.random.key(0)))


def test_sigkill_mid_run_then_restart_gives_the_uninterrupted_losses(reference, tmp_path):
    proc = _run_toy_subprocess(tmp_path, TOY_SIGKILL_BEFORE_STEP=6)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpt = checkpoint.Checkpointer(tmp_path)
    survived = ckpt.latest_step()
    ckpt.close()
    assert survived in (2, 4)  # step 4's async write may or may not have finished
    assert not checkpoint.stage_is_complete(tmp_path)
    killed = _train_records(tmp_path)
    assert killed[-1]["step"] == 5  # the killed run got past its last checkpoint

    _toy.run(_config(tmp_path))  # restart in the same work dir
    _assert_same_history(metrics.read_metrics(tmp_path), reference[1])
    assert checkpoint.stage_is_complete(tmp_path)


def test_sigterm_saves_exits_zero_and_resumes(reference, tmp_path):
    proc = _run_toy_subprocess(tmp_path, TOY_SIGTERM_BEFORE_STEP=5)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.latest_step() == 5  # saved right after the step during which SIGTERM came
    data_state = ckpt.restore_data_state(5)
    ckpt.close()
    # 48 rows in batches of 16: 3 per epoch, so 5 batches = all of epoch 0 + 2 of epoch 1.
    assert data_state["epoch"] == 1 and data_state["position"] == 32
    assert not checkpoint.stage_is_complete(tmp_path)

    _toy.run(_config(tmp_path))
    _assert_same_history(metrics.read_metrics(tmp_path), reference[1])
    assert checkpoint.stage_is_complete(tmp_path)


def _poisoned(data, bad_step, first_step=1):
    """Batches whose `poison` field is NaN at `bad_step` (so only the loss goes non-finite)."""
    it = ArrayIterator(data, 16, seed=0)
    step = first_step
    while True:
        batch = next(it)
        batch["poison"] = np.full((16,), np.nan if step == bad_step else 0.0, np.float32)
        step += 1
        yield batch


def test_non_finite_loss_stops_without_saving_the_bad_state(tmp_path):
    c = _config(tmp_path, log_every=4, ckpt_every=2, eval_every=0)
    trainer = tr.Trainer(c, "toy")
    opt = optim.make_optimizer(c.optim, STEPS)
    state, _ = trainer.create_state(lambda: _toy.init_params(jax.random.key(0)),
                                    _toy.param_axes(), opt)

    def loss_fn(params, frozen, batch, rng):
        loss, sums = _toy.loss_fn(params, frozen, batch, rng)
        return loss + jnp.sum(batch["poison"]), sums

    with pytest.raises(FloatingPointError, match=r"non-finite loss=nan at step 3.*step 2"):
        trainer.fit(state, tr.make_train_step(loss_fn, opt, 2), _poisoned(_toy.make_data(), 3))
    trainer.close()
    assert checkpoint.Checkpointer(tmp_path).all_steps() == [2]  # step 4 was not saved
    assert not checkpoint.stage_is_complete(tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_python_step_without_jit_summary_and_extending_a_finished_run(tmp_path):
    c = _config(tmp_path, steps=3, ckpt_every=0, eval_every=0)
    trainer = tr.Trainer(c, "toy")
    opt = optim.make_optimizer(c.optim, 3)
    state, _ = trainer.create_state(_toy.init_params(jax.random.key(0)), _toy.param_axes(), opt)
    jitted = trainer.jit_step(tr.make_train_step(functools.partial(_toy.loss_fn), opt, 2))
    calls = []

    def composite(st, frozen, batch, rng):  # e.g. PPO: jitted pieces plus host-side bookkeeping
        calls.append(int(st.step))
        st, m = jitted(st, frozen, batch, rng)
        return st, {**m, "host_metric": 1.5 * len(calls)}

    def fit(steps):
        t = tr.Trainer(_config(tmp_path, steps=steps, ckpt_every=0, eval_every=0), "toy")
        st, _ = t.create_state(_toy.init_params(jax.random.key(0)), _toy.param_axes(), opt)
        it = ArrayIterator({k: v[:48] for k, v in _toy.make_data().items()}, 16, seed=0)
        st = t.fit(st, composite, it, jit=False, final_params=lambda s: {"policy": s.params})
        return t, st

    trainer.close()
    trainer, state = fit(3)
    trainer.write_summary({"win_rate": 0.75})
    trainer.close()
    assert calls == [0, 1, 2]
    assert [r["host_metric"] for r in _train_records(tmp_path)] == [1.5, 3.0, 4.5]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["win_rate"] == 0.75 and summary["final"]["host_metric"] == 4.5
    final, meta = checkpoint.load_stage_params(tmp_path)
    assert meta["step"] == 3
    for a, b in zip(jax.tree.leaves(final["policy"]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))

    # Rerunning the finished stage trains nothing and keeps its numbers.
    trainer, _ = fit(3)
    trainer.close()
    assert calls == [0, 1, 2]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["step"] == 3 and summary["final"]["host_metric"] == 4.5
    # Asking for more steps continues from the checkpoint and replaces the hand-off.
    trainer, state = fit(4)
    trainer.close()
    assert calls == [0, 1, 2, 3]
    assert checkpoint.final_step(tmp_path) == 4
    final, _ = checkpoint.load_stage_params(tmp_path)
    for a, b in zip(jax.tree.leaves(final["policy"]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
