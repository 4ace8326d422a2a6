"""The one cached-run helper: keys, ignored fields, the finished-check, the lock."""

import hashlib
import json
import multiprocessing
import time

import ml_collections
import pytest

from rlhf_jax import checkpoint, provenance, runcache, zoo
from rlhf_jax.errors import UserError


def _config(**train):
    c = ml_collections.ConfigDict(dict(
        workdir="/somewhere", seed=0, optim=dict(lr=1e-3),
        train=dict(steps=10, log_every=5, eval_every=5, ckpt_every=100, **train),
        eval=dict(num_prompts=16, judges=("vader",)),
        data=dict(source=dict(kind="sim", world="")),  # at its KEY_NEUTRAL value
    ))
    return c


def test_key_is_stable_and_hashes_what_decides_the_run():
    c = _config()
    # Pinned: a change to how keys are formed would silently retrain every cached run. The
    # form is the one stage dirs were named by before this module (so their caches still hold).
    assert runcache.key(c) == "7b7958966e26"
    old = json.dumps([provenance.key_dict(c), []], sort_keys=True, default=str)
    assert runcache.key(c, digits=10) == hashlib.sha256(old.encode()).hexdigest()[:10]
    assert runcache.key(c, digits=10) == runcache.key(c)[:10]
    moved = _config()
    moved.workdir = "/elsewhere"
    assert runcache.key(moved) == runcache.key(c)  # the work dir is not part of the key
    neutral = _config()
    del neutral.data.source["world"]  # a KEY_NEUTRAL field missing = at its neutral value
    assert runcache.key(neutral) == runcache.key(c)
    other = _config()
    other.optim.lr = 2e-3
    assert runcache.key(other) != runcache.key(c)
    assert runcache.key(c, "upstream-a") != runcache.key(c, "upstream-b") != runcache.key(c)


def test_params_only_ignores_eval_and_cadence_not_training():
    base = runcache.key(_config(), ignore=runcache.PARAMS_ONLY)
    for field, value in (("train.log_every", 1), ("train.eval_every", 0),
                         ("train.ckpt_every", 7), ("eval.num_prompts", 64)):
        c = _config()
        c[field.split(".")[0]][field.split(".")[1]] = value
        assert runcache.key(c, ignore=runcache.PARAMS_ONLY) == base, field
        assert runcache.key(c) != runcache.key(_config()), field  # without ignore it counts
    renamed = _config()
    renamed.eval = ml_collections.ConfigDict(dict(prompts=16))  # a renamed eval field
    assert runcache.key(renamed, ignore=runcache.PARAMS_ONLY) == base
    steps = _config()
    steps.train.steps = 11
    assert runcache.key(steps, ignore=runcache.PARAMS_ONLY) != base
    # The zoo keys base models this way.
    assert zoo.config_key(renamed) == zoo.config_key(_config())


def test_finished_check_marker_checkpoint_and_files(tmp_path, monkeypatch):
    d = tmp_path / "run"
    assert runcache.finished(d) is None
    runcache.mark_done(d, "k1", seconds=3)
    assert runcache.finished(d, "k1")["seconds"] == 3
    assert runcache.finished(d)["key"] == "k1"
    with pytest.raises(UserError, match="belongs to a run with key 'k1'"):
        runcache.finished(d, "k2")
    assert runcache.finished(d, "k1", files=("summary.json",)) is None
    (d / "summary.json").write_text("{}")
    assert runcache.finished(d, "k1", files=("summary.json",)) is not None
    # A stage written without a marker: finished = its final checkpoint.
    stage = tmp_path / "stage"
    stage.mkdir()
    monkeypatch.setattr(checkpoint, "stage_is_complete", lambda w: str(w) == str(stage))
    assert runcache.finished(stage)["status"] == runcache.DONE
    assert runcache.finished(tmp_path / "other") is None


def test_ensure_runs_once_reuses_and_finds_legacy_dirs(tmp_path):
    calls = []
    d = tmp_path / "new"
    out, reused = runcache.ensure(d, lambda: calls.append(1), key="k")
    assert (out, reused, calls) == (d, False, [1])
    out, reused = runcache.ensure(d, lambda: calls.append(2), key="k")
    assert (out, reused, calls) == (d, True, [1])
    runcache.ensure(d, lambda: calls.append(3), key="k", reuse=False)
    assert calls == [1, 3]
    old = tmp_path / "old"
    runcache.mark_done(old)
    out, reused = runcache.ensure(tmp_path / "newer", lambda: calls.append(4), legacy=[old])
    assert (out, reused, calls) == (old, True, [1, 3])


def _hold(path, seconds):
    with runcache.lock(path):
        time.sleep(seconds)


def test_lock_excludes_other_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_hold, args=(str(tmp_path / "w"), 3.0))
    p.start()
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "w" / runcache.LOCK).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        with runcache.lock(tmp_path / "w", wait=False) as got:
            assert not got  # held by the other process
        t0 = time.monotonic()
        with runcache.lock(tmp_path / "w") as got:  # waits until it is released
            assert got
        assert time.monotonic() - t0 > 0.1
        with runcache.lock(tmp_path / "w", enabled=False) as got:
            assert got
    finally:
        p.join()
