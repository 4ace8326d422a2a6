"""Orbax checkpoints: restore onto other meshes, crash-safety, stage hand-off."""

import copy
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rlhf_jax import checkpoint, optim, sharding
from rlhf_jax.errors import UserError
from rlhf_jax import trainer as tr
from tests import _toy


def _config(workdir, data, fsdp):
    c = copy.deepcopy(_toy.get_config())
    with c.unlocked():
        c.workdir = str(workdir)
        c.mesh.update(dict(data=data, fsdp=fsdp, tensor=1))
        c.train.batch_size = 16
        c.train.accum_steps = 1
    return c


def _trained_state(trainer, beta=0.5):
    optimizer = optim.make_optimizer(trainer.config.optim, 10)
    state, data_state = trainer.create_state(lambda: _toy.init_params(jax.random.key(3)),
                                             _toy.param_axes(), optimizer, extra={"beta": beta})
    return state, data_state, optimizer


def _assert_trees_equal(a, b):
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_on_2x4_restore_on_4x2_and_on_one_device(tmp_path):
    t1 = tr.Trainer(_config(tmp_path, 2, 4), "toy")
    state, data_state, optimizer = _trained_state(t1)
    assert data_state is None
    step = t1.jit_step(tr.make_train_step(_toy.loss_fn, optimizer))
    batch = t1.to_global({k: v[:16] for k, v in _toy.make_data().items()})
    for i in range(2):  # non-trivial Adam moments
        state, _ = step(state, None, batch, jax.random.key(i))
    state = state.replace(extra={"beta": state.extra["beta"] * 3})  # e.g. an adapted KL coef
    assert state.params["up"]["kernel"].sharding.spec == P("fsdp")  # mlp→tensor is size 1
    assert state.opt_state[1].mu["up"]["kernel"].sharding.spec == P("fsdp")
    t1.metadata["norm"] = {"gain": 2.0}
    t1.save(2, state)
    t1.close()
    saved = jax.device_get(state)

    # Same work dir, a 4×2 mesh: create_state resumes instead of initialising.
    t2 = tr.Trainer(_config(tmp_path, 4, 2), "toy")
    assert t2.resume_step == 2
    restored, data_state, _ = _trained_state(t2, beta=0.0)
    assert data_state == {}
    assert float(restored.extra["beta"]) == 1.5  # the saved value wins over the initial one
    _assert_trees_equal(saved, restored)
    w = restored.opt_state[1].nu["up"]["kernel"]
    assert dict(w.sharding.mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert {s.data.shape for s in w.addressable_shards} == {(8, 32)}  # 16 rows / fsdp=2
    meta = t2.checkpointer.restore_metadata(2)
    assert meta["norm"] == {"gain": 2.0} and meta["stage"] == "toy" and meta["step"] == 2
    assert meta["config"]["mesh"]["fsdp"] == 4  # the config of the run that wrote it
    t2.close()

    # One device, straight through the Checkpointer with an abstract tree.
    mesh1 = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    abstract = jax.eval_shape(lambda: saved)
    p_sh = sharding.logical_to_shardings(_toy.param_axes(), mesh1, None, abstract.params)
    o_sh = tr.opt_state_shardings(abstract.opt_state, abstract.params, p_sh, mesh1)
    sh = tr.TrainState(step=sharding.replicated(mesh1), params=p_sh, opt_state=o_sh,
                       extra={"beta": sharding.replicated(mesh1)})
    ckpt = checkpoint.Checkpointer(tmp_path)
    one, _, _ = ckpt.restore(checkpoint.abstract_tree(abstract, sh))
    ckpt.close()
    _assert_trees_equal(saved, one)
    assert one.params["embed"]["embedding"].sharding.device_set == {jax.devices()[0]}


def test_opt_state_shardings_follow_params_and_replicate_scalars():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params = jax.eval_shape(lambda: _toy.init_params(jax.random.key(0)))
    p_sh = sharding.logical_to_shardings(_toy.param_axes(), mesh, None, params)
    cfg = _toy.get_config()
    opt = jax.eval_shape(optim.make_optimizer(cfg.optim, 10).init, params)
    o_sh = tr.opt_state_shardings(opt, params, p_sh, mesh)
    adam = o_sh[1]
    assert adam.mu["up"]["kernel"].spec == P("fsdp", "tensor")
    assert adam.nu["embed"]["embedding"].spec == P("tensor", "fsdp")
    assert adam.count.spec == P()
    assert o_sh[-1].hyperparams["learning_rate"].spec == P()


KILL_MID_SAVE = textwrap.dedent("""
    import os, signal, sys, time
    import jax, jax.numpy as jnp
    from rlhf_jax import checkpoint
    ckpt = checkpoint.Checkpointer(sys.argv[1], keep=3)
    ckpt.save(1, {"w": jnp.full((4,), 1.0), "big": jnp.zeros((8,), jnp.float32)}, {"epoch": 1})
    ckpt.wait()
    # Step 2 is big (256 MB), so its background write is still going when the kill lands. Orbax
    # may create the tmp dir in a background thread too: kill as soon as it exists, so the crash
    # is mid-save (not before the save began, which is what made this test flaky).
    ckpt.save(2, {"w": jnp.full((4,), 2.0), "big": jnp.ones((64 * 2**20,), jnp.float32)})
    root = os.path.join(sys.argv[1], "checkpoints")
    deadline = time.monotonic() + 60
    while not any(n.startswith("2.orbax-checkpoint-tmp") for n in os.listdir(root)):
        if time.monotonic() > deadline:
            sys.exit("step 2's tmp dir never appeared")
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_crash_mid_save_keeps_the_previous_checkpoint_readable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, str(tmp_path)], cwd=os.getcwd(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckdir = tmp_path / "checkpoints"
    assert (ckdir / "1").is_dir()
    assert not (ckdir / "2").exists()  # the half-written step never got its final name
    assert any(p.name.startswith("2.orbax-checkpoint-tmp") for p in ckdir.iterdir())
    ckpt = checkpoint.Checkpointer(tmp_path)
    assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
    abstract = {"w": jax.ShapeDtypeStruct((4,), np.float32), "big": jax.ShapeDtypeStruct(
        (8,), np.float32)}
    state, data_state, meta = ckpt.restore(checkpoint.abstract_tree(
        abstract, sharding.replicated(sharding.make_mesh({"data": -1}))))
    np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
    assert data_state == {"epoch": 1} and meta["step"] == 1
    # The resumed run writes step 2 again: the debris is cleared first, the new step lands.
    ckpt.save(2, {"w": state["w"] + 1, "big": state["big"]})
    ckpt.close()
    assert sorted(p.name for p in ckdir.iterdir()) == ["1", "2"]
    assert checkpoint.Checkpointer(tmp_path).all_steps() == [1, 2]


def test_stage_handoff_final_params(tmp_path):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4})
    params = _toy.init_params(jax.random.key(5))
    axes = _toy.param_axes()
    placed = jax.device_put(params, sharding.logical_to_shardings(axes, mesh, None, params))
    assert not checkpoint.stage_is_complete(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="interrupted"):
        checkpoint.load_stage_params(tmp_path)
    checkpoint.save_final(tmp_path, placed, {"stage": "sft", "tokenizer_dir": tmp_path / "tok",
                                             "model": {"vocab": 32, "dims": (16, 32)}}, step=7)
    assert checkpoint.stage_is_complete(tmp_path)

    host, meta = checkpoint.load_stage_params(tmp_path)  # no shardings: numpy on the host
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(host))
    _assert_trees_equal(params, host)
    assert meta == {"step": 7, "stage": "sft", "tokenizer_dir": str(tmp_path / "tok"),
                    "model": {"vocab": 32, "dims": [16, 32]}}

    mesh2 = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    on_mesh, _ = checkpoint.load_stage_params(
        tmp_path, lambda abstract: sharding.logical_to_shardings(axes, mesh2, None, abstract))
    _assert_trees_equal(params, on_mesh)
    assert on_mesh["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert dict(on_mesh["embed"]["embedding"].sharding.mesh.shape)["tensor"] == 4
