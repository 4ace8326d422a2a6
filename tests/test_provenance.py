"""A work dir never lies: reruns with another config are refused, writers never keep stale output.

The toy stage (`tests/_toy.py`) runs in-process through the real `Trainer`; the converter runs
through `rlhf_jax.convert.main`.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import shutil

import jax
import numpy as np
import pytest

from rlhf_jax import checkpoint, provenance
from rlhf_jax.errors import UserError
from tests import _toy


def _config(workdir, **changes):
    c = copy.deepcopy(_toy.get_config("steps=4"))
    with c.unlocked():
        c.workdir = str(workdir)
        for path, value in changes.items():
            node = c
            *parents, leaf = path.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return c


def _files(workdir):
    return {name: (workdir / name).read_bytes()
            for name in (provenance.CONFIG_FILE, provenance.PROVENANCE_FILE)}


@pytest.fixture(scope="module")
def _trained_once(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("trained") / "run"
    _toy.run(_config(workdir))
    return workdir


@pytest.fixture
def trained(_trained_once, tmp_path):
    """A finished 4-step toy run (trained once, copied for each test)."""
    workdir = tmp_path / "run"
    shutil.copytree(_trained_once, workdir)
    return workdir


@pytest.fixture(autouse=True)
def _no_opt_in():
    yield
    provenance.allow_changes(())


# ----------------------------------------------------------------------------------- reruns


def test_a_changed_config_is_refused_naming_the_field(trained):
    before = _files(trained)
    assert json.loads(before["provenance.json"])["config_hash"] == provenance.config_hash(
        _config(trained))
    for change, field, why in (({"optim.lr": 1e-3}, "config.optim.lr", "optim.lr 0.03 -> 0.001"),
                               ({"train.batch_size": 32}, "config.train.batch_size", "16 -> 32"),
                               ({"train.steps": 3}, "config.train.steps", "may only grow")):
        with pytest.raises(UserError) as e:
            _toy.run(_config(trained, **change))
        assert e.value.where == field and why in e.value.what, e.value.line()
        assert "--allow_config_change=" in e.value.fix and "--config.workdir" in e.value.fix
        assert _files(trained) == before  # byte-identical
    # Moving the work dir is not a change: only `workdir` differs, nothing is rewritten.
    moved = trained.parent / "moved"
    trained.rename(moved)
    assert not provenance.check_workdir(_config(moved), moved).pending
    assert _files(moved) == before


def test_more_steps_and_other_cadence_resume(trained):
    summary = _toy.run(_config(trained, **{"train.steps": 6, "train.log_every": 2,
                                           "train.ckpt_every": 3}))
    assert summary["step"] == 6
    steps = [json.loads(line)["step"] for line in
             (trained / "metrics.jsonl").read_text().splitlines() if "eval/" not in line]
    assert steps == [1, 2, 3, 4, 6]  # the resumed part logs every 2nd step
    recorded = json.loads((trained / "config.json").read_text())
    assert recorded["train"]["steps"] == 6 and recorded["train"]["log_every"] == 2
    prov = json.loads((trained / "provenance.json").read_text())
    assert prov["config_hash"] == provenance.config_hash(recorded)
    (entry,) = prov["history"]
    assert entry["resumed_at_step"] == 4 and entry["opted_in"] == []
    assert entry["changes"] == {"train.ckpt_every": [2, 3], "train.log_every": [1, 2],
                                "train.steps": [4, 6]}
    _, meta = checkpoint.load_stage_params(trained)
    assert meta["step"] == 6 and meta["config_hash"] == prov["config_hash"]


def test_a_failed_rerun_leaves_the_record_byte_identical(trained, monkeypatch):
    before = _files(trained)
    ckpts = sorted(p.name for p in (trained / "checkpoints").iterdir())

    def fail(self):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(_toy._Hooks, "__next__", fail)
    with pytest.raises(OSError, match="simulated"):
        _toy.run(_config(trained, **{"train.steps": 8}))
    assert _files(trained) == before
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ckpts


def test_an_explicit_opt_in_continues_and_is_recorded(trained):
    provenance.allow_changes(["config.optim.lr"])
    _toy.run(_config(trained, **{"optim.lr": 1e-3, "train.steps": 6}))
    assert json.loads((trained / "config.json").read_text())["optim"]["lr"] == 1e-3
    (entry,) = json.loads((trained / "provenance.json").read_text())["history"]
    assert entry["opted_in"] == ["optim.lr"] and entry["changes"]["optim.lr"] == [0.03, 1e-3]


def test_allow_list_rules_and_flag():
    assert provenance.why_refused("train.steps", 4, 6) is None
    assert "only grow" in provenance.why_refused("train.steps", 6, 4)
    for field in ("train.log_every", "train.eval_every", "train.eval_batches", "train.ckpt_every",
                  "train.keep_checkpoints", "mesh.data", "sharding_rules",
                  "distributed.num_processes"):
        assert provenance.why_refused(field, 1, 2) is None, field
    assert provenance.why_refused("optim.lr", 0.1, 0.2) == "optim.lr 0.1 -> 0.2"
    assert provenance.why_refused("train.batch_size", 8, 16)
    assert provenance.diff({"a": {"b": 1, "c": [1, 2]}, "workdir": "x"},
                           {"a": {"b": 1, "c": [1, 3], "d": 0}, "workdir": "y"}) == {
        "a.c": ([1, 2], [1, 3]), "a.d": ("<absent>", 0)}
    argv, fields = provenance.pop_allow_flag(
        ["prog", "--allow_config_change=optim.lr,config.seed", "--config=x.py",
         "--allow_config_change", "model.preset"])
    assert argv == ["prog", "--config=x.py"] and fields == ["optim.lr", "seed", "model.preset"]


def test_restoring_a_checkpoint_of_another_model_names_it(tmp_path):
    import jax.numpy as jnp

    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)})
    ckpt.close()
    ckpt = checkpoint.Checkpointer(tmp_path)
    wrong = {"w": jax.ShapeDtypeStruct((8, 3), jnp.float32),
             "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
    with pytest.raises(UserError) as e:
        ckpt.restore(wrong)
    assert e.value.where.endswith("checkpoints/1")
    assert "w has shape (4, 3) in the checkpoint, (8, 3) here" in e.value.what
    ckpt.close()


# ---------------------------------------------------------------------------------- writers


def test_save_final_never_keeps_a_stale_step(tmp_path):
    checkpoint.save_final(tmp_path, {"w": np.zeros(3, np.float32)}, {"v": 1}, step=0)
    with pytest.raises(UserError, match="already exists"):
        checkpoint.save_final(tmp_path, {"w": np.ones(3, np.float32)}, {"v": 2}, step=0)
    checkpoint.save_final(tmp_path, {"w": np.ones(3, np.float32)}, {"v": 2}, step=0,
                          overwrite=True)
    params, meta = checkpoint.load_stage_params(tmp_path)
    np.testing.assert_array_equal(params["w"], np.ones(3))
    assert meta["v"] == 2


def test_resumed_runs_drop_the_sample_tables_written_after_the_checkpoint(tmp_path):
    from rlhf_jax.metrics import MetricWriter

    samples = tmp_path / "samples.md"
    tables = "".join(f"\n## step {n} (gold 0.1)\n\n| prompt | response |\n" for n in (0, 2, 3))
    samples.write_text(tables)
    MetricWriter(tmp_path, resume_step=2, tensorboard=False)  # the checkpoint is at step 2
    assert [line for line in samples.read_text().splitlines() if line.startswith("## ")] == [
        "## step 0 (gold 0.1)", "## step 2 (gold 0.1)"]
    MetricWriter(tmp_path, resume_step=0, tensorboard=False)  # no checkpoint: all are redone
    assert samples.read_text() == ""


def test_convert_refuses_a_non_empty_dst_and_overwrite_replaces_it(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from rlhf_jax import convert
    from tests._hf_tiny import tiny_gpt2

    old_hf, new_hf = tmp_path / "old_hf", tmp_path / "new_hf"
    tiny_gpt2(old_hf)
    tiny_gpt2(new_hf)
    weights = new_hf / "model.safetensors"  # other weights, same architecture
    save_file({k: v + 1.0 for k, v in load_file(weights).items()}, weights,
              metadata={"format": "pt"})
    dst = tmp_path / "stage"
    assert convert.main(["hf-to-orbax", "--src", str(old_hf), "--dst", str(dst)]) == 0
    old, _ = checkpoint.load_stage_params(dst)
    assert convert.main(["hf-to-orbax", "--src", str(new_hf), "--dst", str(dst)]) == 2
    assert "error: --dst: " in capsys.readouterr().err
    jax.tree.map(np.testing.assert_array_equal, checkpoint.load_stage_params(dst)[0], old)
    assert convert.main(["hf-to-orbax", "--src", str(new_hf), "--dst", str(dst),
                         "--overwrite"]) == 0
    assert "(read back: identical)" in capsys.readouterr().out
    new, _ = checkpoint.load_stage_params(dst)
    np.testing.assert_array_equal(new["embed"]["embedding"], old["embed"]["embedding"] + 1.0)
    _, ref = __import__("rlhf_jax.models.hf", fromlist=["hf"]).load_hf(str(new_hf))
    jax.tree.map(np.testing.assert_array_equal, new, jax.device_get(ref))

    # Export an RM (score head + reward_norm.json), then a policy over it: nothing stale stays.
    rm = tmp_path / "rm"
    _, meta = checkpoint.load_stage_params(dst)
    head = {"kernel": np.ones(32, np.float32), "bias": np.float32(0.5)}
    checkpoint.save_final(rm, {**old, "score_head": head},
                          {**meta, "reward_norm": {"gain": 2.0, "bias": 0.0}}, step=3)
    out = tmp_path / "hf_out"
    assert convert.main(["orbax-to-hf", "--src", str(rm), "--dst", str(out)]) == 0
    assert {"reward_norm.json", "score_head.safetensors"} <= {p.name for p in out.iterdir()}
    assert convert.main(["orbax-to-hf", "--src", str(dst), "--dst", str(out)]) == 2
    assert convert.main(["orbax-to-hf", "--src", str(dst), "--dst", str(out),
                         "--overwrite"]) == 0
    assert not {"reward_norm.json", "score_head.safetensors"} & {p.name for p in out.iterdir()}
    np.testing.assert_array_equal(load_file(out / "model.safetensors")["transformer.wte.weight"],
                                  new["embed"]["embedding"])
    # --overwrite never deletes an input of the command.
    assert convert.main(["orbax-to-hf", "--src", str(dst), "--dst", str(tmp_path),
                         "--overwrite"]) == 2
    assert "an input of this command" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- logs


def test_progress_bar_redraws_rarely_off_a_terminal():
    from rlhf_jax.metrics import progress_bar

    log = io.StringIO()  # not a terminal
    bar = progress_bar(2000, desc="sft", file=log)
    for i in range(2000):
        bar.update(1)
        bar.set_postfix(loss=f"{1.0 / (i + 1):.4g}", refresh=False)
    bar.close()
    text = log.getvalue()
    assert text.count("\r") <= 3 and text.count("\n") == 1, text
    assert "2000/2000" in text


def test_dataset_build_logs_one_line_instead_of_tfds_messages(tmp_path, capsys, caplog):
    from rlhf_jax.data import builders

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f" c{i}."}) + "\n"
                            for i in range(3)))
    src = {"kind": "jsonl", "train": str(data), "data_dir": str(tmp_path / "tfds")}
    with caplog.at_level(logging.INFO, logger="rlhf_jax"):
        builders.load_sft_texts(src, "train")
        builders.load_sft_texts(src, "train")  # cached: no line
    out = capsys.readouterr()
    assert "Downloading and preparing" not in out.out + out.err
    assert "downloaded and prepared" not in out.out + out.err
    built = [r.getMessage() for r in caplog.records if r.getMessage().startswith("built ")]
    assert len(built) == 1 and "train 3" in built[0] and str(tmp_path / "tfds") in built[0]
