"""Weak-to-strong generalization on the simulated world: one (weak, strong, task, loss, seed) trial.

    python -m rlhf_jax.w2s --config=configs/w2s_sim.py
    python -m rlhf_jax.w2s --config=configs/w2s_sim.py:task=sentiment,loss=aux,seed=1
    python -m rlhf_jax.w2s --config=configs/w2s_sim.py:tiny          # seconds, for tests
    python -m rlhf_jax.w2s --config=configs/w2s_sim.py:task=jsonl \
        --config.task.train=mine_train.jsonl --config.task.test=mine_test.jsonl \
        --config.weak=hf:/models/gpt2 --config.strong=hf:/models/gpt2-large

Preset keys: tiny, task (sentiment | preference | form | jsonl), weak, strong, loss
(naive | aux), seed, schedule (reference | ramp); for get_sweep also seeds (how many), root
(where trial dirs go) and diagonal (include weak == strong pairs); get_config ignores those, so
one arg serves both functions.

`get_sweep(arg)` lists every (weak <= strong) pair of the model sizes x {naive, aux} x seeds as
dotted-override dicts; each names its own `workdir`, and all share `shared_dir`, where the weak
supervisors and ceilings they have in common are trained once.
"""

import ml_collections

from rlhf_jax import config_utils

ENTRY = "rlhf_jax.w2s"  # the program `python -m rlhf_jax.sweep` runs for each trial

# The models of the study, weak to strong: init_from specs, or zoo presets (bare names). On this
# world a model's accuracy after fine-tuning depends on its pretraining, not its width: zoo
# sim-0.1m, 0.4m and 1.6m all reach ~0.91-0.93 on `form`, so no pair of them leaves a gap to
# recover (README). The weakest supervisor is therefore sim-0.1m with no pretraining (0.79 on
# `form`, seed 0), the others the zoo's pretrained 0.4m and 1.6m: weak-to-strong across
# pretraining compute, as GPT-2 -> GPT-4 is.
SIZES = ("scratch:sim-0.1m", "sim-0.4m", "sim-1.6m")
TINY_SIZES = ("sim-0.1m", "sim-0.4m")


def get_config(arg: str | None = None):
    preset = config_utils.parse_preset(arg)
    config_utils.check_preset_keys(
        preset, ("tiny", "task", "weak", "strong", "loss", "seed", "schedule", "preset", "seeds",
                 "root", "diagonal"), __file__)
    tiny = bool(preset.get("tiny")) or preset.get("preset") == "tiny"
    sizes = TINY_SIZES if tiny else SIZES

    c = config_utils.base_config()
    del c["init_from"]  # the models are `weak`, `strong` and `medium`
    del c.train["steps"]  # each model's steps come from train.epochs and its rows
    del c.train["eval_batches"]  # the whole test split is scored
    c.workdir = "runs/w2s/trial"
    c.shared_dir = "runs/w2s/shared"  # weak supervisors and ceilings, reused across trials
    c.seed = int(preset.get("seed", 0))  # the A/B split, head init order and batches

    def spec(name):
        return name if ":" in name else f"{scheme}:{name}"

    # zoo:<preset> | hf:<dir> | scratch:<preset> | a finished stage's work dir. The tiny preset
    # trains from scratch (no zoo pretraining: seconds, for tests and smoke runs).
    scheme = "scratch" if tiny else "zoo"
    c.weak = spec(preset.get("weak", sizes[0]))
    c.strong = spec(preset.get("strong", sizes[-1]))
    c.medium = ""  # "" = none; else bootstrapping weak -> medium -> strong

    # form by default: the task where the zoo's larger models did better (see the README); on
    # sentiment they did not, which leaves no gap for the weak supervisor to fall short of.
    task = preset.get("task", "form")
    c.task = ml_collections.ConfigDict(dict(
        kind=task,
        num_train=512 if tiny else 4000,  # halved: A for the weak supervisor, B for the students
        num_test=256 if tiny else 1000,
        world_seed=0,
        judge="vader",  # preference: the gold judge that picks the better response
        # preference: pairs whose gold scores differ by <= this are dropped. Clear preferences
        # only: sim-0.1m reached 0.576 with 0.5 against 0.50 (chance) with 0 (2 epochs).
        tie_margin=0.5,
        # Text + EOS, in tokens (measured on 4000 rows: sentiment <= 24, form <= 35, pairs <= 64).
        max_len={"sentiment": 32, "form": 40}.get(task, 64),
        train="",  # jsonl: files of {"text": ..., "label": 0 | 1}
        test="",
        skip_bad_rows=False,  # jsonl: skip and count malformed rows instead of stopping
    ))
    c.loss = ml_collections.ConfigDict(dict(
        kind=preset.get("loss", "naive"),  # naive: soft-label CE | aux: auxiliary confidence
        alpha=0.5,  # the aux coefficient after warm-up (reference code: 0.5)
        warmup_frac=0.1,  # share of training over which c warms up (reference code: 0.1)
        schedule=preset.get("schedule", "reference"),  # reference (jumps) | ramp (the paper's)
    ))
    # The reference: Adam, cosine decay to 0, no warm-up, batch 32, 2 epochs, and a smaller
    # learning rate for its larger models (5e-5 for GPT-2 small/medium, 1e-5 above). Here a
    # model of width d trains at optim.lr * (lr_ref_width / d) ** lr_width_power: 3e-3 for
    # sim-0.1m (d 48), 2.1e-3 for sim-0.4m (d 96), 1.6e-3 for sim-1.6m (d 160). Probe runs on
    # `form` (2 epochs of 2000 rows, seed 0): sim-0.4m 0.928 at 1.5e-3 but 0.856 at 3e-3;
    # sim-1.6m 0.934 at 4.5e-4 but 0.904 at 2.7e-4. The defaults of the two larger sizes
    # (2.1e-3, 1.6e-3) were not among the probes.
    c.optim.lr = 3e-3
    c.lr_ref_width = 48  # the d_model optim.lr is meant for (0: every size at optim.lr)
    c.lr_width_power = 0.5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.end_lr_ratio = 0.0
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.0
    c.train.batch_size = 32
    c.train.epochs = 2.0  # over the half a model trains on: steps = epochs * rows / batch
    c.train.eval_every = 0  # test accuracy at the end only
    c.train.ckpt_every = 1000
    c.train.log_every = 10
    c.eval_batch_size = 256
    c.lock()
    return c


def get_sweep(arg: str | None = None) -> list[dict]:
    """Every (weak <= strong) pair x {naive, aux} x seeds, as dotted overrides of get_config(arg).

    `arg` takes the preset keys of get_config plus `seeds` (count, default 3) and `root` (where
    the shared models and, under experiments.weak_to_strong, the trial work dirs go, default
    runs/w2s). Also a `python -m rlhf_jax.sweep` config (ENTRY): every trial then runs in
    `<sweep workdir>/<trial name>`. Pairs with weak == strong are included (the reference
    sweep runs them; their PGR has a near-zero denominator and is reported as such); the tiny
    preset leaves them out (`diagonal=False`) to stay within a CI budget.
    """
    preset = config_utils.parse_preset(arg)
    tiny = bool(preset.get("tiny")) or preset.get("preset") == "tiny"
    seeds = int(preset.get("seeds", 2 if tiny else 3))
    root = str(preset.get("root", "runs/w2s_tiny" if tiny else "runs/w2s"))
    diagonal = bool(preset.get("diagonal", not tiny))
    sizes = TINY_SIZES if tiny else SIZES
    scheme = "scratch" if tiny else "zoo"
    out = []

    def spec(name):
        return name if ":" in name else f"{scheme}:{name}"

    for i, weak in enumerate(sizes):
        for strong in sizes[i if diagonal else i + 1:]:
            for loss in ("naive", "aux"):
                for seed in range(seeds):
                    # No workdir: `python -m rlhf_jax.sweep` gives each trial its own, and
                    # experiments.weak_to_strong names them <root>/<task>/<weak>_to_<strong>/...
                    out.append({
                        "weak": spec(weak), "strong": spec(strong),
                        "loss.kind": loss,
                        "seed": seed, "shared_dir": f"{root}/shared"})
    return out
