"""LoRA: the adapter math in the projection, the trained/frozen split, the Trainer's adapter-only
state and checkpoints, and the PEFT export/import round trips."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models
from rlhf_jax.models import lora

ALL = ("q", "k", "v", "o", "gate", "up", "down")


def _cfg(**kw):
    base = dict(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                d_ff=48, max_len=32, tie_embeddings=False)
    base.update(kw)
    return models.ModelConfig(**base)


def _batch(cfg, B=2, T=8, seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)
    mask = jnp.ones((B, T), bool)
    return tokens, models.positions_from_mask(mask), mask


def _with_random_b(params, seed=3, std=0.05):
    """An adapter with non-zero B (as after training)."""
    leaves, tdef = jax.tree_util.tree_flatten_with_path(params)
    keys = iter(jax.random.split(jax.random.key(seed), len(leaves)))
    out = [std * jax.random.normal(next(keys), x.shape, x.dtype)
           if path[-1].key == "lora_b" else x for path, x in leaves]
    return jax.tree_util.tree_unflatten(tdef, out)


def _logits(cfg, params, batch):
    tokens, positions, mask = batch
    return models.forward(cfg, params, tokens, positions, mask)["logits"]


@pytest.mark.parametrize("kv_heads", [4, 2])  # fused qkv path / grouped-query path
def test_zero_b_equals_base_and_merge_equals_adapter_path(kv_heads):
    cfg = _cfg(n_kv_heads=kv_heads)
    base = models.init_params(cfg, jax.random.key(0))
    batch = _batch(cfg)
    full = lora.attach(base, lora.LoraSpec(rank=4, alpha=8.0, targets=ALL), jax.random.key(1))
    # B = 0: exactly the base (bit for bit).
    np.testing.assert_array_equal(_logits(cfg, full, batch), _logits(cfg, base, batch))
    full = _with_random_b(full)
    adapted = _logits(cfg, full, batch)
    assert float(jnp.max(jnp.abs(adapted - _logits(cfg, base, batch)))) > 1e-3
    merged = lora.merge(full)
    assert not lora.has_adapter(merged)
    np.testing.assert_allclose(_logits(cfg, merged, batch), adapted, atol=1e-5, rtol=0)
    # strip = adapter off = base.
    np.testing.assert_array_equal(_logits(cfg, lora.strip(full), batch),
                                  _logits(cfg, base, batch))


def test_long_sequences_take_the_stacked_path_with_adapters():
    # >= 256 tokens per call stacks q/k/v and gate/up into one matmul; adapters stay per projection.
    cfg = _cfg(n_kv_heads=4, max_len=512)
    full = _with_random_b(lora.attach(models.init_params(cfg, jax.random.key(0)),
                                      lora.LoraSpec(rank=2, targets=ALL), jax.random.key(1)))
    batch = _batch(cfg, B=1, T=300)
    np.testing.assert_allclose(_logits(cfg, full, batch), _logits(cfg, lora.merge(full), batch),
                               atol=1e-5, rtol=0)


def test_decode_params_with_adapter_match_merged():
    cfg = _cfg()
    full = _with_random_b(lora.attach(models.init_params(cfg, jax.random.key(0)),
                                      lora.LoraSpec(rank=2, targets=("q", "v", "down")),
                                      jax.random.key(1)))
    batch = _batch(cfg)
    dp = models.decode_params(cfg, full)
    np.testing.assert_allclose(_logits(cfg, dp, batch), _logits(cfg, lora.merge(full), batch),
                               atol=1e-5, rtol=0)


def test_split_join_and_axes():
    cfg = _cfg()
    base = models.init_params(cfg, jax.random.key(0), heads=("lm", "score"))
    full = lora.attach(base, lora.LoraSpec(rank=4, targets=("q", "o")), jax.random.key(1))
    trained, frozen = lora.split(full)
    names = {"/".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(trained)[0]}
    assert names == {"layers/q/lora_a", "layers/q/lora_b", "layers/o/lora_a", "layers/o/lora_b",
                     "score_head/kernel", "score_head/bias"}
    assert jax.tree.structure(lora.join(trained, frozen)) == jax.tree.structure(full)
    assert lora.split(base) == (base, {})  # no adapter: everything trains
    axes = lora.adapter_axes(models.param_axes(cfg, ("lm", "score")), full)
    q, o = axes["layers"]["q"], axes["layers"]["o"]
    assert q["lora_a"] == ("layers", "embed", None)
    assert q["lora_b"] == ("layers", None, "heads", "head_dim")
    assert o["lora_a"] == ("layers", "heads", "head_dim", None)
    assert o["lora_b"] == ("layers", None, "embed")
    assert jax.tree.structure(axes, is_leaf=lambda x: isinstance(x, tuple)) == \
        jax.tree.structure(jax.tree.map(lambda _: (), full), is_leaf=lambda x: x == ())
    # Sharded by the same rules: on an fsdp mesh A's embed axis is split like the kernel's.
    from rlhf_jax import sharding
    mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
    rules = sharding.rules_from_config({})
    sh = sharding.logical_to_shardings(axes, mesh, rules, jax.eval_shape(lambda: full))
    a_spec, k_spec = sh["layers"]["q"]["lora_a"].spec, sh["layers"]["q"]["kernel"].spec
    assert tuple(a_spec)[:2] == tuple(k_spec)[:2] and "fsdp" in tuple(a_spec)


def test_gradients_reach_only_the_adapter_in_the_compiled_program():
    cfg = _cfg(n_kv_heads=4)
    full = _with_random_b(lora.attach(models.init_params(cfg, jax.random.key(0)),
                                      lora.LoraSpec(rank=4, targets=ALL), jax.random.key(1)))
    trained, frozen = lora.split(full)
    tokens, positions, mask = _batch(cfg)

    def loss(t, f):
        return jnp.mean(models.forward(cfg, lora.join(t, f), tokens, positions, mask)["logits"] ** 2)

    grad = jax.jit(jax.grad(loss))
    g = grad(trained, frozen)
    assert jax.tree.structure(g) == jax.tree.structure(trained)
    assert all(float(jnp.abs(x).sum()) > 0 for x in jax.tree.leaves(g))
    # No weight-gradient matmul of a frozen kernel: with D=32, F=48, V=64, every base kernel
    # gradient would be a dot producing a [D, F]-, [F, D]- or [D, V]-shaped (or stacked) result.
    hlo = grad.lower(trained, frozen).compile().as_text()
    full_grad_hlo = jax.jit(jax.grad(lambda p: loss({}, p))).lower(full).compile().as_text()

    def weight_grad_dots(text):
        import re
        shapes = re.findall(r"= f32\[([\d,]+)\]\{[^}]*\} (?:dot|convolution)\(", text)
        return [s for s in shapes if s in ("32,48", "48,32", "32,64", "64,32", "2,32,48")]

    assert weight_grad_dots(full_grad_hlo), "the check cannot fail: no base-gradient dot found"
    assert weight_grad_dots(hlo) == []


# ------------------------------------------------------------------------------- the trainer


def _trainer(tmp_path, name, **lora_block):
    from rlhf_jax import config_utils, trainer
    c = config_utils.base_config()
    c.workdir = str(tmp_path / name)
    c.init_from = str(tmp_path / "base")  # recorded as the adapter's base
    c.lora.update(lora_block)
    return trainer.Trainer(c, "test", async_checkpoints=False)


def _nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_lora_state_memory_and_one_base_for_policy_and_reference(tmp_path):
    from rlhf_jax import optim, trainer as trainer_lib
    from rlhf_jax import config_utils
    cfg = _cfg(d_model=64, d_ff=176, n_layers=2, vocab_size=256)
    opt_cfg = config_utils.base_config().optim
    sizes = {}
    for name, rank in (("full", 0), ("lora", 4)):
        tr = _trainer(tmp_path, name, rank=rank)
        policy = tr.place(models.init_params(cfg, jax.random.key(0)), models.param_axes(cfg))
        optimizer = optim.make_optimizer(opt_cfg, 10)
        state, _ = tr.create_state(policy, models.param_axes(cfg), optimizer)
        trained = tr._trained(state)
        sizes[name] = (_nbytes(trained.params), _nbytes(trained.opt_state))
        if rank:
            # The frozen base the steps read is the policy's own buffers (the reference a
            # method passes as `frozen` is the same arrays): one base tree, not two.
            ptr = lambda t: {x.addressable_shards[0].data.unsafe_buffer_pointer()  # noqa: E731
                             for x in jax.tree.leaves(t)}
            assert ptr(lora.strip(tr.lora_base)) == ptr(policy)
            assert not (ptr(trained.params) & ptr(policy))
            # A step's jit arguments: trained state + (frozen=reference, base) = the base once.
            step = trainer_lib.make_train_step(
                lambda p, f, b, k: (jnp.sum(models.forward(cfg, p, b["t"], b["pos"], b["m"])
                                            ["logits"][..., 0]), {"count": jnp.float32(1)}),
                optimizer)
            jitted = tr.jit_step(step, frozen=policy)
            batch = tr.to_global({"t": np.zeros((8, 8), np.int32),
                                  "pos": np.tile(np.arange(8), (8, 1)),
                                  "m": np.ones((8, 8), bool)})
            # Distinct device buffers among the step's arguments: base once + adapter + Adam.
            args = (trained, (policy, tr.lora_base))
            distinct_bytes = sum({x.addressable_shards[0].data.unsafe_buffer_pointer(): x.nbytes
                                  for x in jax.tree.leaves(args)}.values())
            assert distinct_bytes < _nbytes(policy) + 1.2 * (sizes["lora"][0] + sizes["lora"][1])
            new, metrics = jitted(trained, (policy, tr.lora_base), batch, jax.random.key(0))
            assert jax.tree.structure(new.params) == jax.tree.structure(trained.params)
        tr.close()
    full_t, full_o = sizes["full"]
    lora_t, lora_o = sizes["lora"]
    print(f"trainable bytes full={full_t} lora={lora_t}; optimizer bytes full={full_o} "
          f"lora={lora_o}")
    assert lora_t < 0.1 * full_t and lora_o < 0.1 * full_o


def _sft(tmp_path, name, *args):
    from rlhf_jax import config_utils, sft
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    config = config_utils.parse_config_argv(
        ["sft", f"--config={root / 'configs' / 'sft_sim.py'}:smoke",
         f"--config.workdir={tmp_path / name}", "--config.eval.num_prompts=0",
         "--config.model.preset=sim-0.1m", "--config.optim.schedule=constant", *args])
    return sft.run(config)


def test_lora_sft_trains_the_adapter_resumes_exactly_and_hands_off(tmp_path):
    from rlhf_jax import checkpoint, handoff
    from rlhf_jax.metrics import read_metrics
    _sft(tmp_path, "base")  # a 2-step base from scratch
    lora_args = [f"--config.init_from={tmp_path / 'base'}", "--config.lora.rank=4",
                 "--config.lora.alpha=8", "--config.optim.lr=1e-2", "--config.train.log_every=1"]
    _sft(tmp_path, "a", *lora_args, "--config.train.steps=12")
    losses = [r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r]
    assert len(losses) == 12 and np.mean(losses[-3:]) < losses[0] - 0.05, losses
    # Adapter-only checkpoints and hand-off.
    adapter, meta = checkpoint.load_stage_params(tmp_path / "a")
    names = {"/".join(str(getattr(k, "key", k)) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(adapter)[0]}
    assert names and all(n.endswith(("lora_a", "lora_b")) for n in names), names
    assert meta["lora"]["rank"] == 4 and meta["lora"]["base"] == str(tmp_path / "base")
    ckpt = checkpoint.Checkpointer(tmp_path / "a", async_save=False)
    stored = ckpt._stored_tree(ckpt.latest_step())
    ckpt.close()
    stored_names = {"/".join(str(getattr(k, "key", k)) for k in p)
                    for p, _ in jax.tree_util.tree_flatten_with_path(stored["params"])[0]}
    assert stored_names == names  # the rolling checkpoint holds the adapter, not the base
    # Resume: 6 steps, then extended to 12 = 12 uninterrupted, bit for bit.
    _sft(tmp_path, "b", *lora_args, "--config.train.steps=6")
    _sft(tmp_path, "b", *lora_args, "--config.train.steps=12")
    adapter_b, _ = checkpoint.load_stage_params(tmp_path / "b")
    for x, y in zip(jax.tree.leaves(adapter), jax.tree.leaves(adapter_b)):
        np.testing.assert_array_equal(x, y)
    # The next stage starts from base + adapter, merged.
    base = handoff.load_policy(str(tmp_path / "base"))
    merged = handoff.load_policy(str(tmp_path / "a"))
    assert not lora.has_adapter(merged.params)
    full = lora.with_scales(lora.join(base.params, adapter), alpha=8.0)
    full = jax.tree.map(jnp.asarray, full)
    batch = _batch(merged.cfg)
    np.testing.assert_allclose(_logits(merged.cfg, merged.params, batch),
                               _logits(merged.cfg, full, batch), atol=1e-5, rtol=0)
    assert float(jnp.max(jnp.abs(_logits(merged.cfg, merged.params, batch)
                                 - _logits(base.cfg, base.params, batch)))) > 1e-4


# ------------------------------------------------------------------------------ PEFT round trip


def _hf_llama(path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
        attn_implementation="eager")).eval()
    model.save_pretrained(str(path))
    return model


def _torch_logits(model, tokens):
    import torch
    with torch.no_grad():
        return model(input_ids=torch.tensor(np.asarray(tokens))).logits.float().numpy()


def test_peft_export_loads_in_peft_and_peft_adapter_imports(tmp_path):
    peft = pytest.importorskip("peft")
    import copy
    from rlhf_jax import checkpoint, convert, handoff
    hf_model = _hf_llama(tmp_path / "hf")
    convert.hf_to_orbax(str(tmp_path / "hf"), str(tmp_path / "base"))
    base = handoff.load_policy(str(tmp_path / "base"))
    cfg = base.cfg
    tokens = np.random.default_rng(0).integers(0, 96, (2, 10))
    mask = np.ones_like(tokens, bool)
    batch = (jnp.asarray(tokens), models.positions_from_mask(jnp.asarray(mask)), jnp.asarray(mask))

    # (a) An adapter made here -> PEFT -> same logits in PyTorch.
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=ALL)
    full = _with_random_b(lora.attach(jax.tree.map(jnp.asarray, base.params), spec,
                                      jax.random.key(1)), std=0.2)
    ours = np.asarray(_logits(cfg, full, batch))
    meta = dict(base.meta, lora={**spec.to_dict(), "base": str(tmp_path / "base")})
    checkpoint.save_final(tmp_path / "lora_stage", jax.device_get(lora.partition(full, True)),
                          meta, step=1)
    convert.export_peft(str(tmp_path / "lora_stage"), str(tmp_path / "peft_out"))
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(hf_model), str(tmp_path / "peft_out"))
    theirs = _torch_logits(peft_model.eval(), tokens)
    assert np.max(np.abs(ours - _logits(cfg, base.params, batch))) > 1e-2  # the adapter matters
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # The merged full model (orbax-to-hf of a LoRA stage) loads in transformers alike.
    convert.orbax_to_hf(str(tmp_path / "lora_stage"), str(tmp_path / "merged_hf"))
    import transformers
    merged_hf = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "merged_hf")).eval()
    np.testing.assert_allclose(_torch_logits(merged_hf, tokens), ours, atol=1e-4, rtol=0)

    # (b) A PEFT adapter made in PyTorch (random, non-zero B) -> import -> same logits here.
    import torch
    torch.manual_seed(1)
    pc = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "o_proj",
                                                            "down_proj"],
                         init_lora_weights=False, task_type="CAUSAL_LM")
    made = peft.get_peft_model(copy.deepcopy(hf_model), pc).eval()
    made.save_pretrained(str(tmp_path / "peft_in"))
    theirs = _torch_logits(made, tokens)
    convert.import_peft(str(tmp_path / "base"), str(tmp_path / "peft_in"), str(tmp_path / "imp"))
    imported = handoff.load_policy(str(tmp_path / "imp"))  # base + adapter, merged
    np.testing.assert_allclose(np.asarray(_logits(cfg, imported.params, batch)), theirs,
                               atol=1e-4, rtol=0)
    assert np.max(np.abs(theirs - _torch_logits(hf_model, tokens))) > 1e-2


def test_default_lora_block_keeps_cache_keys_and_resumes_old_work_dirs():
    from rlhf_jax import config_utils, provenance
    c = config_utils.base_config()
    old = c.to_dict()
    del old["lora"]  # a config recorded before the block existed
    assert provenance.strip_neutral(c.to_dict()) == provenance.strip_neutral(old)
    assert provenance.diff(old, c.to_dict()) == {}
    c.lora.rank = 4
    assert "lora.rank" in provenance.diff(old, c.to_dict())
    assert "lora" in provenance.strip_neutral(c.to_dict())


def test_jit_update_donates_only_the_adapter_and_keeps_the_reference(tmp_path):
    # An on-policy update that takes its own gradients over the full params (as PPO's does).
    import optax
    from rlhf_jax import config_utils, optim
    cfg = _cfg()
    tr = _trainer(tmp_path, "upd", rank=4)
    policy = tr.place(models.init_params(cfg, jax.random.key(0)), models.param_axes(cfg))
    optimizer = optim.make_optimizer(config_utils.base_config().optim, 10)
    state, _ = tr.create_state(policy, models.param_axes(cfg), optimizer)
    tokens, positions, mask = _batch(cfg, B=8)

    def update_fn(params, opt_state, tokens):
        loss = lambda p: jnp.mean(  # noqa: E731
            models.forward(cfg, p, tokens, positions, mask)["logits"][..., 0] ** 2)
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {"loss": value}

    update = tr.jit_update(update_fn)
    params, opt_state, metrics = update(state.params, tr._trained(state).opt_state, tokens)
    assert not any(x.is_deleted() for x in jax.tree.leaves(policy))  # the reference survives
    assert params["embed"]["embedding"] is policy["embed"]["embedding"]  # the base, not a copy
    b0 = state.params["layers"]["q"]["lora_b"]
    assert b0.is_deleted()  # the trained part was donated ...
    assert float(jnp.abs(params["layers"]["q"]["lora_b"]).sum()) > 0  # ... and updated
    tr.close()
