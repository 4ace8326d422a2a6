"""Every user error is one line: a table of mistakes, each run through its real entry point.

Each case runs `python -m <entry point> ...` as a subprocess and asserts exit status 2, exactly
one line on stderr (`error: <where>: ...`), no traceback, and the field or file named. Every
error is raised before anything trains or compiles, so a case costs about an interpreter start
plus imports; the cases run a few at a time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rlhf_jax import errors

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"


# ------------------------------------------------------------------------------- in-process


def test_user_error_line_and_entry_point_helper(capsys):
    e = errors.UserError("config.optim.lr", "-1 must be >= 0", "give a learning rate >= 0")
    assert isinstance(e, ValueError)
    assert e.line() == str(e) == "config.optim.lr: -1 must be >= 0; give a learning rate >= 0"
    assert errors.UserError("f.jsonl:3", "bad\n  row").line() == "f.jsonl:3: bad row"

    def fail():
        raise errors.UserError("f.jsonl:3", "missing field 'prompt'")

    with pytest.raises(SystemExit) as exit_info:
        errors.report_user_errors(fail)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: f.jsonl:3: missing field 'prompt'\n"
    with pytest.raises(SystemExit):
        errors.report_user_errors(fail, verbose=True)
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: f.jsonl:3: missing field 'prompt'\n")
    with pytest.raises(KeyError):  # a bug keeps its exception (and so its traceback, exit 1)
        errors.report_user_errors(lambda: {}["x"])
    assert errors.pop_verbose(["prog", "--verbose", "--config=x"]) == (["prog", "--config=x"], True)


# --------------------------------------------------------------------------------- fixtures


SFT_JSONL_CONFIG = '''
"""SFT on local JSONL files with a local tokenizer (the test's own config file)."""
from configs import sft_sim


def get_config(arg=None):
    c = sft_sim.get_config("smoke")
    with c.unlocked():
        c.tokenizer = {tok!r}
        c.model.preset = "sim-0.1m"
        c.data.source = dict(kind="jsonl", train={train!r}, eval={train!r},
                             skip_malformed=False, data_dir={data_dir!r})
    c.lock()
    return c
'''


def _word_tokenizer(path: Path, n_words: int) -> None:
    """A WordLevel tokenizer with `n_words` words + specials (more tokens than the tiny model)."""
    import transformers
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>"] + [f"w{i}" for i in range(n_words)])}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                         eos_token="<eos>").save_pretrained(str(path))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Inputs shared by the cases: a tiny HF model, its import as a stage, data files, an SFT
    work dir that 'trained' under a recorded config, and a warm dataset cache."""
    from tests._hf_tiny import tiny_gpt2

    from rlhf_jax import checkpoint, config_utils, convert, provenance
    from rlhf_jax.data import builders

    root = tmp_path_factory.mktemp("errors")
    cache = root / "cache"
    hf = root / "hf"
    tiny_gpt2(hf)  # vocab 300
    _word_tokenizer(root / "big_tok", 400)
    stage = root / "stage"
    convert.hf_to_orbax(str(hf), str(stage), verify=False)
    (root / "empty.jsonl").write_text("")
    rows = [{"prompt": f"Human: say {w}\n\nAssistant:", "completion": f" {w} {w}."}
            for w in ("hello", "there", "friend", "again")] * 4
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + '{"prompt": "x"}\n')
    (root / "empty_dir").mkdir()
    config_file = root / "sft_jsonl.py"
    config_file.write_text(SFT_JSONL_CONFIG.format(tok=str(hf), train=str(root / "sft.jsonl"),
                                                   data_dir=str(root / "tfds")))
    # Warm the dataset cache here, once, so the parallel cases never build it concurrently.
    for split in ("train", "eval"):
        builders.load_sft_texts({"kind": "jsonl", "train": str(root / "sft.jsonl"),
                                 "eval": str(root / "sft.jsonl"), "skip_malformed": False,
                                 "data_dir": str(root / "tfds")}, split)

    # An SFT work dir with a recorded config and a saved checkpoint (of a model that is not
    # what this config builds: a rerun that gets past the config check fails at restore).
    trained = root / "trained"
    argv = ["sft", f"--config={config_file}", f"--config.workdir={trained}"]
    provenance.check_workdir(config_utils.parse_config_argv(argv), trained)
    import jax.numpy as jnp

    from rlhf_jax.trainer import TrainState

    ckpt = checkpoint.Checkpointer(trained, async_save=False)
    ckpt.save(2, TrainState(step=jnp.asarray(2, jnp.int32), params={"w": jnp.ones((4, 4))},
                            opt_state={}, extra={}))
    ckpt.close()
    return {"root": root, "cache": cache, "hf": hf, "stage": stage, "config": config_file,
            "trained": trained}


def _cases(e) -> list[tuple[str, list[str], str]]:
    """(name, argv after `python`, text the error line must contain)."""
    r = e["root"]
    sft = ["-m", "rlhf_jax.sft", f"--config={e['config']}"]
    new = lambda name: f"--config.workdir={r / 'w' / name}"  # noqa: E731
    rerun = sft + [f"--config.workdir={e['trained']}"]
    rm_hh = ["-m", "rlhf_jax.rm", "--config=configs/rm_hh.py:smoke",
             f"--config.init_from=hf:{e['hf']}", f"--config.data.source.data_dir={r / 'tfds'}",
             f"--config.data.source.eval=('{FIX / 'hh_rlhf.jsonl'}',)"]
    ppo = ["-m", "rlhf_jax.ppo", "--config=configs/ppo_sim.py:smoke"]
    pipe = ["-m", "experiments.pipeline", "--config=configs/pipeline_sim.py:tiny",
            f"--config.workdir={r / 'w' / 'pipe'}"]
    convert = ["-m", "rlhf_jax.convert"]
    return [
        # SFT
        ("sft objective", sft + [new("s1"), "--config.objective=rl"], "config.objective: 'rl'"),
        ("zoo preset", sft + [new("s2"), "--config.init_from=zoo:sim-9m"],
         "config.init_from: zoo:sim-9m is not a base model of the zoo; use zoo:<one of sim-0.1m"),
        ("empty jsonl", sft + [new("s3"), f"--config.data.source.train={r / 'empty.jsonl'}"],
         f"{r / 'empty.jsonl'}: no usable example"),
        ("rerun, other lr", rerun + ["--config.optim.lr=1e-3"],
         "config.optim.lr: differs from the config that trained"),
        ("rerun, other model size", rerun + ["--config.model.preset=sim-0.4m"],
         "config.model.preset: differs from the config that trained"),
        ("rerun opted in, checkpoint does not fit",
         rerun + ["--config.model.preset=sim-0.4m", "--allow_config_change=model.preset"],
         f"{e['trained'] / 'checkpoints' / '2'}: does not fit this run's train state"),
        ("sft preset key", ["-m", "rlhf_jax.sft", "--config=configs/sft_sim.py:bogus=1"],
         "--config=sft_sim.py: unknown preset key(s) ['bogus']"),
        # RM
        ("rm loss kind", ["-m", "rlhf_jax.rm", "--config=configs/rm_sim.py:smoke", new("r1"),
                          "--config.loss.kind=hinge"], "config.loss.kind: 'hinge'"),
        ("rm tokenizer/model mismatch",
         rm_hh + [new("r5"), f"--config.tokenizer={r / 'big_tok'}",
                  f"--config.data.source.train=('{FIX / 'hh_rlhf.jsonl'}',)"],
         "config.tokenizer: the tokenizer has 402 tokens but the model's vocab_size is 300"),
        # PPO
        ("ppo mesh", ppo + [new("p2"), "--config.mesh.data=3", "--config.init_from=a",
                            "--config.reward_from=b"], "config.mesh.data: "),
        ("ppo missing reward model", ppo + [new("p3"), f"--config.init_from={e['stage']}",
                                            f"--config.reward_from={r / 'no_rm'}"],
         f"config.reward_from: no finished stage output at {r / 'no_rm' / 'final'}"),
        # the pipeline
        ("pipeline unknown field", pipe + ["--config.sft.optim.lrr=1"],
         "--config.sft.optim.lrr=1: config.sft.optim has no field 'lrr'"),
        ("pipeline bad preset",
         ["-m", "experiments.pipeline", "--config=configs/pipeline_sim.py:tinyy"],
         "--config=pipeline_sim.py: unknown preset 'tinyy'"),
        # convert
        ("convert into a non-empty dst", convert + ["hf-to-orbax", "--src", str(e["hf"]),
                                                    "--dst", str(e["stage"])],
         f"--dst: {e['stage']} is not empty"),
        ("convert from a non-HF dir", convert + ["hf-to-orbax", "--src", str(r / "empty_dir"),
                                                 "--dst", str(r / "w" / "c2")],
         f"{r / 'empty_dir' / 'config.json'}: not found"),
    ]


def _run(argv, e):
    env = {**os.environ, "RLHF_JAX_CACHE": str(e["cache"]), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_every_user_error_is_one_line_exit_2(env):
    cases = _cases(env)
    assert len(cases) >= 15
    config_before = (env["trained"] / "config.json").read_bytes()
    with ThreadPoolExecutor(max_workers=4) as pool:  # a few at a time: each is mostly imports
        procs = list(pool.map(lambda c: _run(c[1], env), cases))
    failures = []
    for (name, argv, needle), proc in zip(cases, procs):
        lines = proc.stderr.splitlines()
        ok = (proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr
              and lines[0].startswith("error: ") and needle in lines[0])
        if not ok:
            failures.append(f"{name}: exit {proc.returncode}, {len(lines)} stderr lines, "
                            f"want {needle!r}:\n{proc.stderr[-1500:]}")
    assert not failures, "\n\n".join(failures)
    # Refused and failed reruns left the work dir's record as it was.
    assert (env["trained"] / "config.json").read_bytes() == config_before
    assert sorted(p.name for p in (env["trained"] / "checkpoints").iterdir()) == ["2"]
    assert not (env["trained"] / "final").exists()
    # The refused convert left the old import in place.
    assert sorted(p.name for p in (env["stage"] / "final").iterdir()) == ["0"]


def test_verbose_adds_the_traceback(env):
    proc = _run(["-m", "rlhf_jax.sft", f"--config={env['config']}", "--verbose",
                 f"--config.workdir={env['root'] / 'w' / 'v'}", "--config.objective=rl"], env)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "sft.py" in proc.stderr
    assert proc.stderr.splitlines()[-1] == ("error: config.objective: 'rl' is not one of the "
                                            "options; use one of ('sft', 'pretrain')")
