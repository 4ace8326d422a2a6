"""Mesh construction, logical→mesh rules, divisibility fallback, host → global batches."""

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rlhf_jax import sharding
from tests import _toy


def test_make_mesh_fills_minus_one_and_uses_auto_axes():
    mesh = sharding.make_mesh({"data": 2, "fsdp": -1, "tensor": 1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert dict(sharding.make_mesh({"data": -1}).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    one = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    assert one.devices.size == 1


@pytest.mark.parametrize("cfg, field, hint", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "config.mesh.data", "config.mesh.data=8"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "config.mesh.data: -1", "divides 8"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "config.mesh", "only one axis"),
    ({"data": 2, "fsdp": 2, "tensor": 4}, "config.mesh.tensor", "config.mesh.tensor=2"),
    ({"data": 0, "fsdp": 1, "tensor": 1}, "config.mesh.data", "positive"),
    ({"data": -1, "model": 2}, "config.mesh", "model"),
])
def test_mesh_that_does_not_fit_names_the_field(cfg, field, hint):
    with pytest.raises(ValueError) as e:
        sharding.make_mesh(cfg)
    assert field in str(e.value) and hint in str(e.value)


def test_rules_override_from_config_and_bad_override():
    rules = dict(sharding.rules_from_config({"sharding_rules": (("embed", None),
                                                                ("mlp", ("fsdp", "tensor")))}))
    assert rules["embed"] is None and rules["mlp"] == ("fsdp", "tensor")
    assert rules["heads"] == "tensor"  # untouched defaults stay
    with pytest.raises(ValueError, match=r"config.sharding_rules\[1\].*'model'"):
        sharding.rules_from_config({"sharding_rules": (("embed", None), ("mlp", "model"))})
    with pytest.raises(ValueError, match=r"config.sharding_rules\[0\]"):
        sharding.rules_from_config({"sharding_rules": ("embed",)})


def test_logical_to_spec():
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim")) == P(
        None, "fsdp", "tensor")
    # Activations: batch already takes fsdp, so embed must not reuse it.
    assert sharding.logical_to_spec(("batch", "length", "embed")) == P(("data", "fsdp"))
    assert sharding.logical_to_spec((None, "vocab")) == P(None, "tensor")
    with pytest.raises(ValueError, match="'embd' has no sharding"):
        sharding.logical_to_spec(("embd", "mlp"))


def test_indivisible_dim_falls_back_to_replicated_and_logs_once(caplog):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    axes = {"ok": ("embed", "mlp"), "odd": ("embed", "mlp"), "odd2": ("embed", "mlp")}
    shapes = {"ok": np.zeros((4, 6)), "odd": np.zeros((5, 6)), "odd2": np.zeros((5, 6))}
    sharding._warned.clear()
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.sharding"):
        sh = sharding.logical_to_shardings(axes, mesh, None, shapes)
    assert sh["ok"].spec == P("fsdp", "tensor")
    assert sh["odd"].spec == P(None, "tensor")  # 5 % 2: that dim replicated, the other kept
    assert len([r for r in caplog.records if "not divisible" in r.message]) == 1
    placed = jax.device_put(np.arange(30.0).reshape(5, 6), sh["odd"])  # and it places fine
    np.testing.assert_array_equal(np.asarray(placed), np.arange(30.0).reshape(5, 6))
    with pytest.raises(ValueError, match="do not match the array shape"):
        sharding.logical_to_shardings({"w": ("embed",)}, mesh, None, {"w": np.zeros((4, 4))})


def test_axes_from_state_matches_pure_dict_structure():
    abstract = nnx.eval_shape(lambda: _toy.ToyLM(nnx.Rngs(0)))
    axes = sharding.axes_from_state(nnx.state(abstract, nnx.Param))
    assert axes == {"embed": {"embedding": ("vocab", "embed")},
                    "up": {"kernel": ("embed", "mlp"), "bias": ("mlp",)},
                    "down": {"kernel": ("mlp", "vocab"), "bias": ("vocab",)}}
    params = _toy.init_params(jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(axes, is_leaf=sharding.is_axes_leaf)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sh = sharding.logical_to_shardings(axes, mesh, None, params)
    assert sh["up"]["kernel"].spec == P("fsdp", "tensor")
    assert sh["embed"]["embedding"].spec == P("tensor", "fsdp")


def test_host_to_global_shards_the_batch_over_data_and_fsdp():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    host = {"tokens": np.arange(16 * 3).reshape(16, 3), "mask": np.ones((16,), np.int32)}
    out = sharding.host_to_global(host, mesh)
    assert out["tokens"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in out["tokens"].addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(out["tokens"]), host["tokens"])
    with pytest.raises(ValueError, match=r"\['mask'\] has 12 rows.*8 batch shards"):
        sharding.host_to_global({"mask": np.ones((12,))}, mesh)
    # A tensor-parallel mesh only splits the batch over data×fsdp.
    mesh2 = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
    out2 = sharding.host_to_global({"x": np.arange(6.0)}, mesh2)
    assert {s.data.shape for s in out2["x"].addressable_shards} == {(3,)}


def test_distributed_is_off_unless_asked(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    cfg = {"distributed": {"coordinator_address": "", "num_processes": 1, "process_id": 0}}
    assert sharding.maybe_initialize_distributed(cfg) is False
    with pytest.raises(ValueError, match="config.distributed.*process_id < num_processes"):
        sharding.maybe_initialize_distributed({"distributed": {
            "coordinator_address": "127.0.0.1:1", "num_processes": 2, "process_id": 2}})
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert sharding.cluster_env_detected() is None  # a one-task SLURM job is single-process
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert sharding.cluster_env_detected() == "SLURM"
    monkeypatch.delenv("SLURM_JOB_ID")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "a,b")
    assert sharding.cluster_env_detected() == "TPU pod"


def test_fsdp8_holds_an_eighth_of_the_parameter_bytes_per_device():
    """ZeRO-3 layout: on an fsdp=8 mesh each device holds ~1/8 of the policy's parameter bytes
    (measured from the arrays' addressable shards), against all of them when replicated."""
    from rlhf_jax import models

    cfg = models.ModelConfig(arch="llama", vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                             n_kv_heads=2, d_ff=128, max_len=32)
    params = models.init_params(cfg, jax.random.key(0), ("lm",))
    axes = models.param_axes(cfg, ("lm",))
    total = sum(x.nbytes for x in jax.tree.leaves(params))

    def bytes_on_first_device(mesh_cfg):
        mesh = sharding.make_mesh(mesh_cfg)
        placed = jax.device_put(params, sharding.logical_to_shardings(axes, mesh, None, params))
        dev = jax.devices()[0]
        return sum(s.data.nbytes for x in jax.tree.leaves(placed)
                   for s in x.addressable_shards if s.device == dev)

    assert bytes_on_first_device({"data": 8}) == total  # data parallel: replicated
    per_device = bytes_on_first_device({"fsdp": 8})
    assert per_device / total == pytest.approx(1 / 8, abs=0.01), per_device / total
