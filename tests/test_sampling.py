"""Tests for rlhf_jax.sampling: KV-cache decoding against full forward passes, EOS handling,
left padding, filters, sampling frequencies, sharding and Hugging Face greedy parity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, sampling, sharding

V = 64


def _cfg(arch="llama", **kw):
    base = dict(arch=arch, vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_len=64)
    if arch == "llama":
        base["n_kv_heads"] = 2  # grouped-query attention in the cache
    base.update(kw)
    return models.ModelConfig(**base)


def _params(cfg, seed=0, scale=5.0):
    # Default init gives near-uniform logits (std ~0.1), where greedy is a coin toss between
    # near-ties; scaling every weight gives logits of std ~3, so comparisons are meaningful.
    p = models.init_params(cfg, jax.random.key(seed))
    return jax.tree.map(lambda x: x * scale, p)


def _left_pad(rows, length, pad=0):
    toks = np.full((len(rows), length), pad, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        toks[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return jnp.asarray(toks), jnp.asarray(mask)


PROMPTS = [[5, 9, 17], [3, 4, 5, 6, 7, 8, 9], [40], [11, 12, 13, 14, 15]]


def _teacher_forced_logits(cfg, params, out):
    """Logits predicting each response token, from one full forward pass over the sequence."""
    full = models.forward(cfg, params, out.sequence_tokens, out.sequence_positions,
                          out.sequence_mask)["logits"]
    P = out.sequence_tokens.shape[1] - out.tokens.shape[1]
    return full[:, P - 1:-1]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cache_logits_match_full_forward(arch):
    cfg = _cfg(arch)
    params = _params(cfg)
    toks, mask = _left_pad(PROMPTS, 9)
    out = sampling.generate(cfg, params, toks, mask, jax.random.key(1), max_new_tokens=12,
                            eos_id=63, pad_id=0, temperature=1.0, return_logits=True)
    ref = _teacher_forced_logits(cfg, params, out)
    m = np.asarray(out.mask, bool)
    assert m.sum() > 20
    np.testing.assert_allclose(np.asarray(out.logits)[m], np.asarray(ref)[m], atol=2e-4, rtol=1e-4)


def test_phase_schedule():
    """Decode phases of 8, 8, 16, 32, ... steps; a short tail joins the phase before it."""
    assert sampling._phase_ends(64, True) == (8, 16, 32, 64)
    assert sampling._phase_ends(65, True) == (8, 16, 32, 65)
    assert sampling._phase_ends(100, True) == (8, 16, 32, 64, 100)
    assert sampling._phase_ends(13, True) == (8, 13)
    assert sampling._phase_ends(12, True) == (12,)
    assert sampling._phase_ends(1, True) == (1,)
    assert sampling._phase_ends(64, False) == (64,)


@pytest.mark.parametrize("arch,early_exit", [("llama", True), ("gpt2", False)])
def test_growing_cache_equals_one_full_cache(arch, early_exit):
    """Phases whose cache holds only the slots in use give what one loop over the whole cache
    gives: same tokens, masks, log-probs and logits across the phase boundaries."""
    cfg = _cfg(arch)
    params = _params(cfg, seed=4)
    toks, mask = _left_pad(PROMPTS, 9)
    kw = dict(max_new_tokens=40, eos_id=63, pad_id=0, temperature=0.9, top_k=20,
              early_exit=early_exit, return_logits=True)
    outs = {grow: sampling.generate(cfg, params, toks, mask, jax.random.key(7), grow_cache=grow, **kw)
            for grow in (True, False)}
    a, b = outs[True], outs[False]
    m = np.asarray(a.mask, bool)
    assert m[:, 20:].sum() > 20  # rows run well past the 8- and 16-step phase boundaries
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(a.logits)[m], np.asarray(b.logits)[m], atol=1e-4, rtol=1e-5)

    def n_loops(grow):  # phases (8, 16, 40): three decode loops; without growing: one
        jaxpr = jax.make_jaxpr(lambda p: sampling.generate(
            cfg, p, toks, mask, jax.random.key(7), grow_cache=grow, **kw).tokens)(params)
        return str(jaxpr).count("while[")
    assert (n_loops(True), n_loops(False)) == (3, 1)


@pytest.mark.parametrize("arch,temperature,top_k,top_p", [
    ("llama", 0.7, 0, 1.0), ("llama", 1.3, 8, 0.9), ("gpt2", 0.5, 0, 0.8), ("llama", 0.0, 0, 1.0),
])
def test_logprobs_match_teacher_forcing(arch, temperature, top_k, top_p):
    cfg = _cfg(arch)
    params = _params(cfg, seed=2)
    toks, mask = _left_pad(PROMPTS, 8)
    out = sampling.generate(cfg, params, toks, mask, jax.random.key(3), max_new_tokens=10,
                            eos_id=63, pad_id=0, temperature=temperature, top_k=top_k, top_p=top_p)
    # The documented definition: log_softmax(logits / T) before truncation; T = 1 when greedy.
    t = temperature if temperature > 0 else 1.0
    logp = jax.nn.log_softmax(_teacher_forced_logits(cfg, params, out) / t, axis=-1)
    ref = np.take_along_axis(np.asarray(logp), np.asarray(out.tokens)[..., None], axis=-1)[..., 0]
    m = np.asarray(out.mask, bool)
    # 1e-5 absolute, or relative for the large |log p| of unlikely tokens (f32 rounding).
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], ref[m], atol=1e-5, rtol=1e-5)
    assert np.all(np.asarray(out.logprobs)[~m] == 0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_batch_matches_each_row_alone(arch):
    cfg = _cfg(arch)
    params = _params(cfg, seed=4)
    toks, mask = _left_pad(PROMPTS, 8)
    kw = dict(max_new_tokens=10, eos_id=63, pad_id=0, temperature=0.0)
    batch = sampling.generate(cfg, params, toks, mask, jax.random.key(0), **kw)
    for i in (0, 1, 2):  # lengths 3, 7, 1
        prompt = PROMPTS[i]
        t1, m1 = _left_pad([prompt], len(prompt))  # no padding at all
        alone = sampling.generate(cfg, params, t1, m1, jax.random.key(0), **kw)
        np.testing.assert_array_equal(batch.tokens[i], alone.tokens[0])
        np.testing.assert_array_equal(batch.mask[i], alone.mask[0])
        np.testing.assert_allclose(batch.logprobs[i], alone.logprobs[0], atol=1e-5)
    # Positions continue from each row's real prompt length, not the padded width.
    n = len(PROMPTS[2])
    np.testing.assert_array_equal(batch.sequence_positions[2, 8:], np.arange(n, n + 10))


def test_eos_stops_each_row():
    cfg = _cfg()
    params = _params(cfg, seed=5)
    toks, mask = _left_pad(PROMPTS, 8)
    kw = dict(max_new_tokens=10, temperature=0.0)
    free = sampling.generate(cfg, params, toks, mask, jax.random.key(0), eos_id=63, pad_id=0, **kw)
    free_toks = np.asarray(free.tokens)
    assert not (free_toks == 63).any() and not np.asarray(free.ended).any()
    # Use a token that greedy decoding produces mid-sequence in row 0 as the EOS.
    eos = int(free_toks[0, 3])
    assert eos not in free_toks[0, :3] and eos != 0
    for pad in (eos, 0):  # pad_id == eos_id (real checkpoints) and distinct ids
        out = sampling.generate(cfg, params, toks, mask, jax.random.key(0), eos_id=eos,
                                pad_id=pad, **kw)
        got, m, lp = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
        for b in range(len(PROMPTS)):
            hits = np.flatnonzero(free_toks[b] == eos)
            stop = hits[0] + 1 if hits.size else 10  # number of tokens kept, EOS included
            np.testing.assert_array_equal(got[b, :stop], free_toks[b, :stop])
            np.testing.assert_array_equal(got[b, stop:], pad)
            np.testing.assert_array_equal(m[b], np.arange(10) < stop)
            assert np.all(lp[b, stop:] == 0) and np.all(lp[b, :stop] < 0)
            assert bool(out.ended[b]) == bool(hits.size)
            assert int(out.lengths[b]) == stop
        assert m[0, 3] == 1 and got[0, 3] == eos and m[0, 4:].sum() == 0  # EOS kept, mask 1
        np.testing.assert_array_equal(out.sequence_mask[:, 8:], m)
        np.testing.assert_array_equal(out.sequence_tokens[:, 8:], got)
    # Row 0 alone ends at step 3: leaving the loop then or running all 10 steps gives the same.
    for early_exit in (True, False):
        one_row = sampling.generate(cfg, params, toks[:1], mask[:1], jax.random.key(0),
                                    eos_id=eos, pad_id=0, early_exit=early_exit, **kw)
        np.testing.assert_array_equal(one_row.tokens[0], got[0])
        np.testing.assert_array_equal(one_row.mask[0], m[0])
        np.testing.assert_allclose(one_row.logprobs[0], lp[0], atol=1e-5)


def test_topk1_and_tiny_topp_equal_greedy():
    cfg = _cfg()
    params = _params(cfg, seed=6, scale=3.0)  # flatter logits: plain sampling would differ
    toks, mask = _left_pad(PROMPTS, 8)
    kw = dict(max_new_tokens=10, eos_id=63, pad_id=0)
    greedy = sampling.generate(cfg, params, toks, mask, jax.random.key(0), temperature=0.0, **kw)
    for seed in range(3):
        key = jax.random.key(10 + seed)
        for filt in (dict(top_k=1), dict(top_p=1e-6), dict(top_k=5, top_p=1e-6)):
            s = sampling.generate(cfg, params, toks, mask, key, temperature=1.0, **filt, **kw)
            np.testing.assert_array_equal(s.tokens, greedy.tokens)
            # T = 1 on both sides, so the log-probs agree too.
            np.testing.assert_allclose(s.logprobs, greedy.logprobs, atol=1e-5)
    plain = sampling.generate(cfg, params, toks, mask, jax.random.key(10), temperature=1.0, **kw)
    assert not np.array_equal(plain.tokens, greedy.tokens)


def _one_step_samples(cfg, params, n, **kw):
    toks, mask = _left_pad([[5, 9, 17]] * n, 3)
    out = sampling.generate(cfg, params, toks, mask, jax.random.key(7), max_new_tokens=1,
                            eos_id=63, pad_id=0, **kw)
    logits = models.forward(cfg, params, toks[:1], models.positions_from_mask(mask[:1]),
                            mask[:1])["logits"][0, -1]
    return np.bincount(np.asarray(out.tokens[:, 0]), minlength=V), np.asarray(logits, np.float64)


def _chi2(counts, probs):
    n = counts.sum()
    expected = n * probs
    keep = expected >= 5  # pool the rare bins, as usual for Pearson's test
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(expected[keep], expected[~keep].sum())
    exp_ok = exp > 0
    return float(np.sum((obs[exp_ok] - exp[exp_ok]) ** 2 / exp[exp_ok])), int(exp_ok.sum()) - 1


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_sampling_frequencies_match_softmax():
    cfg = _cfg()
    params = _params(cfg, seed=8, scale=4.0)
    n, temp = 6000, 0.8
    counts, logits = _one_step_samples(cfg, params, n, temperature=temp)
    stat, dof = _chi2(counts, _softmax(logits / temp))
    assert stat < dof + 8 * np.sqrt(2 * dof), (stat, dof)
    # The check has power: the same samples reject the untempered distribution.
    wrong, wdof = _chi2(counts, _softmax(logits))
    assert wrong > wdof + 8 * np.sqrt(2 * wdof), (wrong, wdof)

    # top-k: only the k best tokens, in proportions renormalised among them.
    counts, _ = _one_step_samples(cfg, params, n, temperature=temp, top_k=4)
    top = np.argsort(-logits)[:4]
    assert counts[top].sum() == n
    probs = np.zeros(V)
    probs[top] = _softmax(logits[top] / temp)
    stat, dof = _chi2(counts, probs)
    assert stat < dof + 8 * np.sqrt(2 * dof), (stat, dof)

    # top-p: the smallest prefix of the sorted distribution reaching p.
    counts, _ = _one_step_samples(cfg, params, n, temperature=temp, top_p=0.7)
    p = _softmax(logits / temp)
    order = np.argsort(-p)
    k = int(np.searchsorted(np.cumsum(p[order]), 0.7) + 1)
    nucleus = order[:k]
    assert k > 1 and counts[nucleus].sum() == n
    probs = np.zeros(V)
    probs[nucleus] = p[nucleus] / p[nucleus].sum()
    stat, dof = _chi2(counts, probs)
    assert stat < dof + 8 * np.sqrt(2 * max(dof, 1)), (stat, dof)


def test_deterministic_for_a_key():
    cfg = _cfg()
    params = _params(cfg, seed=9, scale=3.0)
    toks, mask = _left_pad(PROMPTS, 8)
    kw = dict(max_new_tokens=10, eos_id=63, pad_id=0, temperature=1.0)
    a = sampling.generate(cfg, params, toks, mask, jax.random.key(1), **kw)
    b = sampling.generate(cfg, params, toks, mask, jax.random.key(1), **kw)
    c = sampling.generate(cfg, params, toks, mask, jax.random.key(2), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    assert not np.array_equal(a.tokens, c.tokens)


def test_bad_arguments_are_named():
    cfg = _cfg()
    params = _params(cfg)
    toks, mask = _left_pad(PROMPTS, 8)
    kw = dict(max_new_tokens=4, eos_id=1, pad_id=0)
    t7, m7 = _left_pad(PROMPTS, 7)
    right = jnp.asarray(np.asarray(m7)[:, ::-1])  # right padding; row 1 fills all 7 columns
    with pytest.raises(ValueError, match=r"left-padded.*rows \[0, 2, 3\]"):
        sampling.generate(cfg, params, t7, right, jax.random.key(0), **kw)
    with pytest.raises(ValueError, match="top_p"):
        sampling.generate(cfg, params, toks, mask, jax.random.key(0), top_p=0.0, **kw)
    with pytest.raises(ValueError, match="temperature"):
        sampling.generate(cfg, params, toks, mask, jax.random.key(0), temperature=-1.0, **kw)
    with pytest.raises(ValueError, match="eos_id"):
        sampling.generate(cfg, params, toks, mask, jax.random.key(0), max_new_tokens=4,
                          eos_id=V, pad_id=0)
    with pytest.raises(ValueError, match="max_len"):
        sampling.generate(_cfg("gpt2", max_len=16), _params(_cfg("gpt2", max_len=16)), toks,
                          mask, jax.random.key(0), max_new_tokens=9, eos_id=1, pad_id=0)


def test_sharded_generation_equals_single_device():
    assert jax.device_count() >= 8, "conftest.py should give 8 CPU devices"
    cfg = _cfg(n_heads=4, n_kv_heads=2)
    params = _params(cfg, seed=11, scale=3.0)
    prompts = PROMPTS * 2  # batch 8 over data×fsdp = 4 shards
    toks, mask = _left_pad(prompts, 8)
    kw = dict(max_new_tokens=10, eos_id=63, pad_id=0)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shard_params = jax.device_put(params, sharding.logical_to_shardings(
        models.param_axes(cfg), mesh, shapes=params))
    batch = sharding.host_to_global({"t": np.asarray(toks), "m": np.asarray(mask)}, mesh)
    assert len(batch["t"].sharding.device_set) == 8
    for temp in (0.0, 1.0):
        single = sampling.generate(cfg, params, toks, mask, jax.random.key(5), temperature=temp,
                                   **kw)
        sharded = sampling.generate(cfg, shard_params, batch["t"], batch["m"], jax.random.key(5),
                                    temperature=temp, mesh=mesh, **kw)
        np.testing.assert_array_equal(sharded.tokens, single.tokens)
        np.testing.assert_array_equal(sharded.mask, single.mask)
        np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)
        assert sharded.tokens.sharding.spec[0] == ("data", "fsdp")


def _hf_tiny(kind, path):
    """A tiny random `transformers` model saved to `path`, weights scaled for decisive logits."""
    torch = pytest.importorskip("torch")
    t = pytest.importorskip("transformers")
    common = dict(vocab_size=V, bos_token_id=2, eos_token_id=1, pad_token_id=0,
                  attn_implementation="eager")
    if kind == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                               **common))
    else:  # grouped-query attention, untied head, non-default RoPE base
        model = t.LlamaForCausalLM(t.LlamaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
            tie_word_embeddings=False, **common))
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # see _params: greedy on near-uniform logits would compare rounding
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))  # biases / norm scales away from 0 / 1
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_greedy_matches_transformers_generate(kind, tmp_path):
    torch = pytest.importorskip("torch")
    from rlhf_jax.models import hf

    model = _hf_tiny(kind, str(tmp_path / kind))
    cfg, params = hf.load_hf(str(tmp_path / kind))
    toks, mask = _left_pad(PROMPTS, 8)
    N = 12
    with torch.no_grad():
        ref = model.generate(
            input_ids=torch.from_numpy(np.asarray(toks)).long(),
            attention_mask=torch.from_numpy(np.asarray(mask)).long(),
            do_sample=False, max_new_tokens=N, min_new_tokens=N, eos_token_id=None, pad_token_id=0,
            return_dict_in_generate=True, output_logits=True)
    ref_tokens = ref.sequences[:, 8:].numpy()
    out = sampling.generate(cfg, params, toks, mask, jax.random.key(0), max_new_tokens=N,
                            eos_id=1, pad_id=0, temperature=0.0)
    # HF was told never to stop, so compare each row up to our first EOS (inclusive).
    m = np.asarray(out.mask, bool)
    assert m.sum() > len(PROMPTS) * N // 2
    np.testing.assert_array_equal(np.asarray(out.tokens)[m], ref_tokens[m])
    # Greedy log-probs (T = 1) against HF's raw step logits.
    ref_lp = torch.log_softmax(torch.stack(ref.logits, 1).float(), -1).numpy()
    ref_lp = np.take_along_axis(ref_lp, ref_tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], ref_lp[m], atol=1e-4)
