"""Convert between Hugging Face checkpoints and rlhf_jax stage outputs (Orbax).

    python -m rlhf_jax.convert hf-to-orbax --src HF_DIR --dst WORKDIR [--dtype float32]
    python -m rlhf_jax.convert orbax-to-hf --src WORKDIR --dst HF_DIR [--dtype bfloat16]
                                           [--tokenizer-dir DIR] [--no-verify]
    python -m rlhf_jax.convert export-peft --src LORA_WORKDIR --dst PEFT_DIR
    python -m rlhf_jax.convert import-peft --base BASE --src PEFT_DIR --dst WORKDIR

Both refuse a non-empty destination unless `--overwrite` is given, which deletes the
destination first, so nothing stale survives; both then read what they wrote back and check it
bit for bit against what they meant to write (`--no-verify` skips this). Mistakes in the
arguments or inputs print one line, `error: <flag or file>: ...`, and exit 2 (`--verbose`: with
the traceback).

`hf-to-orbax` writes WORKDIR/final like a finished stage (params + metadata with `model_config`
and `tokenizer_dir`), so any stage can start from it with `--config.init_from=WORKDIR`.
`orbax-to-hf` exports a stage's final params to a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads; the tokenizer files are copied from
the stage's `tokenizer_dir` (or --tokenizer-dir) and its BOS/EOS/PAD ids written into
config.json. A score head (reward / value model) goes to `score_head.safetensors` beside it,
and a reward model's `reward_norm` (the gain/bias PPO applies to its scores) to
`reward_norm.json`; `hf-to-orbax` reads both back, so an exported RM scores the same after a
round trip.

LoRA stages (`--config.lora.rank=R`) save only their adapter: `orbax-to-hf` exports their base
with the adapter merged in; `export-peft` writes the adapter in PEFT's format, and
`import-peft` turns a PEFT adapter plus its base into a LoRA stage work dir (docs/lora.md).
"""

from __future__ import annotations

import argparse
import json
import math
import logging
import os
import shutil
import sys
from pathlib import Path

import jax
import numpy as np

from rlhf_jax import checkpoint, errors, models
from rlhf_jax.errors import UserError
from rlhf_jax.models import hf, lora
from rlhf_jax.models.config import DTYPES

log = logging.getLogger(__name__)

# A reward model's score normalisation (stage metadata `reward_norm`), beside the score head.
REWARD_NORM_FILE = "reward_norm.json"

# Files that make a directory loadable by `AutoTokenizer.from_pretrained`.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def _special_token_ids(tokenizer_dir: str, where: str) -> dict:
    """bos/eos/pad ids for config.json, so HF generation stops where our models stop."""
    from rlhf_jax.data.tokenize import load_tokenizer

    tok = load_tokenizer(tokenizer_dir, where)
    ids = {f"{k}_token_id": getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _summary(cfg: models.ModelConfig, params) -> str:
    heads = [h for h in ("lm_head", "score_head") if h in params]
    return (f"{cfg.hf_model_type or cfg.arch}: {models.param_count(params):,} params, "
            f"d_model={cfg.d_model}, n_layers={cfg.n_layers}, vocab={cfg.vocab_size}, "
            f"dtype={cfg.param_dtype}, tied={cfg.tie_embeddings}, heads={heads or ['(tied lm)']}")


def check_destination(dst: str, overwrite: bool, flag: str = "--dst",
                      keep: tuple[str | None, ...] = ()) -> bool:
    """Refuse a non-empty `dst` unless `overwrite`. Returns whether it must be cleared first.

    Called before any work, so a refused command costs nothing. With `overwrite`, the
    filesystem root, the home directory and the current directory or its parents are still
    refused (a mistyped `--dst .` must not wipe a checkout).
    """
    path = Path(dst)
    if path.exists() and not path.is_dir():
        raise UserError(flag, f"{dst} exists and is not a directory", "choose a directory")
    if not path.is_dir() or not any(path.iterdir()):
        return False
    entries = sorted(p.name for p in path.iterdir())
    shown = ", ".join(entries[:5]) + (f", ... ({len(entries)} entries)" if len(entries) > 5 else "")
    if not overwrite:
        raise UserError(flag, f"{dst} is not empty (holds {shown})",
                        "pass --overwrite to replace its contents, or choose another " + flag)
    real = path.resolve()
    for other in filter(None, keep):  # inputs this command still reads
        o = Path(other).resolve()
        if o == real or real in o.parents:
            raise UserError(flag, f"{dst} holds {other}, an input of this command",
                            "choose another " + flag)
    cwd = Path.cwd().resolve()
    if real == Path(real.anchor) or real == Path.home().resolve() or real in (cwd, *cwd.parents):
        raise UserError(flag, f"refusing to delete {real} (the root, home or current directory "
                        "or a parent of it)", "give a dedicated output directory")
    return True


def _clear(dst: str) -> None:
    """Delete `dst` (after `check_destination` allowed it), so no old file survives."""
    if jax.process_index() == 0 and os.path.isdir(dst):
        shutil.rmtree(dst)


def _check_same(written, back, what: str, dst: str) -> None:
    """Every leaf of `back` (read from `dst`) equals `written` bit for bit."""
    flat = jax.tree_util.tree_flatten_with_path(written)[0]
    back_flat = dict(jax.tree_util.tree_flatten_with_path(back)[0])
    if len(flat) != len(back_flat):
        raise RuntimeError(f"{what} check: {dst} holds {len(back_flat)} tensors, expected "
                           f"{len(flat)}")
    for path, x in flat:
        y = back_flat.get(path)
        if y is None or np.asarray(x).dtype != np.asarray(y).dtype or not np.array_equal(
                np.asarray(x), np.asarray(y)):
            raise RuntimeError(f"{what} check: {jax.tree_util.keystr(path)} changed on the way "
                               f"to {dst}")


def hf_to_orbax(src: str, dst: str, dtype: str | None = "float32", *, overwrite: bool = False,
                verify: bool = True) -> str:
    """Import a Hugging Face directory as a finished stage in work dir `dst`.

    A non-empty `dst` is refused unless `overwrite` (then it is deleted first); `verify` reads
    the written params back and checks them bit for bit.
    """
    if not os.path.isdir(src):
        raise UserError("--src", f"{src} is not a directory",
                        "give a Hugging Face model directory (config.json + model.safetensors)")
    clear = check_destination(dst, overwrite, keep=(src,))
    cfg, params = hf.load_hf(src, dtype=dtype)
    params = jax.device_get(params)
    src = os.path.abspath(src)
    meta = {
        "model_config": cfg.to_dict(),
        "tokenizer_dir": src if _has_tokenizer(src) else None,
        "init_from": f"hf:{src}",
        "heads": ["lm", "score"] if "score_head" in params else ["lm"],
    }
    norm_path = os.path.join(src, REWARD_NORM_FILE)
    if os.path.exists(norm_path):
        with open(norm_path) as f:
            norm = json.load(f)
        if not (isinstance(norm, dict) and {"gain", "bias"} <= set(norm)):
            raise UserError(norm_path, "must hold a JSON object with 'gain' and 'bias'")
        meta["reward_norm"] = norm
    if meta["tokenizer_dir"] is None:
        log.warning("%s has no tokenizer files; stages starting from %s need --config.tokenizer",
                    src, dst)
    if clear:
        _clear(dst)
    out = checkpoint.save_final(dst, params, meta, step=0)
    if verify:
        back, back_meta = checkpoint.load_stage_params(dst)
        _check_same(params, back, "import", str(out))
        if back_meta.get("model_config") != meta["model_config"]:
            raise RuntimeError(f"import check: the model config read back from {out} differs")
    print(f"wrote {out}{' (read back: identical)' if verify else ''}: {_summary(cfg, params)}")
    return str(out)


def orbax_to_hf(src: str, dst: str, dtype: str | None = None, tokenizer_dir: str | None = None,
                verify: bool = True, *, overwrite: bool = False) -> str:
    """Export a finished stage's final params (work dir `src`) as a Hugging Face directory.

    A non-empty `dst` is refused unless `overwrite` (then it is deleted first, so no file of an
    earlier export survives); `verify` reads the export back and checks it bit for bit.
    """
    clear = check_destination(dst, overwrite, keep=(src,))
    try:
        params, meta = checkpoint.load_stage_params(src)
        if meta.get("lora"):  # a LoRA stage: its base with the adapter merged in
            from rlhf_jax import handoff

            loaded = handoff.resolve_init(src, field="--src")
            params, meta = loaded.params, dict(meta, tokenizer_dir=loaded.tokenizer_dir)
    except UserError as e:
        raise UserError("--src", f"{e.where}: {e.what}", e.fix) from e
    if "model_config" not in meta:
        raise UserError("--src", f"{src}: the stage metadata has no model_config",
                        "give the work dir of an rlhf_jax stage or of hf-to-orbax")
    cfg = models.ModelConfig.from_dict(dict(meta["model_config"]))
    if dtype is not None:
        cast = np.dtype(jax.numpy.dtype(dtype))
        params = jax.tree.map(lambda x: np.asarray(x).astype(cast), params)
        cfg = cfg.replace(param_dtype=dtype)
    else:
        # Record what the checkpoint actually holds (a stage may train in another dtype).
        dtypes = {np.asarray(x).dtype.name for x in jax.tree.leaves(params)}
        if len(dtypes) == 1 and (only := dtypes.pop()) in DTYPES:
            cfg = cfg.replace(param_dtype=only)
    tok_where = "--tokenizer-dir" if tokenizer_dir else f"{src} (metadata tokenizer_dir)"
    tokenizer_dir = tokenizer_dir or meta.get("tokenizer_dir")
    extra = {}
    if tokenizer_dir:
        if not _has_tokenizer(tokenizer_dir):
            raise UserError(tok_where, f"{tokenizer_dir} has none of {_TOKENIZER_FILES}",
                            "pass --tokenizer-dir=<a Hugging Face tokenizer directory>")
        extra = _special_token_ids(tokenizer_dir, tok_where)
    else:
        log.warning("no tokenizer_dir in %s's metadata and no --tokenizer-dir: exporting weights only", src)
    if clear:
        check_destination(dst, overwrite, keep=(src, tokenizer_dir))
        _clear(dst)
    hf.save_hf(cfg, params, dst, tokenizer_dir=tokenizer_dir, extra_config=extra)
    if meta.get("reward_norm") is not None:
        with open(os.path.join(dst, REWARD_NORM_FILE), "w") as f:
            json.dump(dict(meta["reward_norm"]), f, indent=2)
    if verify:
        # Read the export back with our importer: every tensor must come back bit for bit.
        cfg2, back = hf.load_hf(dst)
        # Runtime-only fields (scan, remat, compute dtype, dropout) are not part of config.json.
        runtime = ("scan_layers", "remat", "dtype", "dropout", "hf_model_type")
        if cfg.replace(**{k: getattr(cfg2, k) for k in runtime}) != cfg2:
            raise RuntimeError(f"export check: config read back from {dst} differs: {cfg2} vs {cfg}")
        _check_same(params, back, "export", dst)
    print(f"wrote {dst}{' (read back: identical)' if verify else ''}: {_summary(cfg, params)}")
    return dst


# ------------------------------------------------------------------------------ PEFT adapters

PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
# Our projection -> the Hugging Face Llama-family module PEFT targets.
PEFT_MODULES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}
_PEFT_KEY = "base_model.model.model.layers.{i}.{module}.lora_{ab}.weight"


def _peft_model_type(cfg: models.ModelConfig, flag: str) -> None:
    if cfg.is_gpt2:
        raise UserError(flag, "PEFT adapters are supported for the Llama family only (GPT-2's "
                        "fused Conv1D c_attn has no per-projection adapter)",
                        "export the merged model instead: convert orbax-to-hf")


def peft_state_dict(adapter: dict, n_layers: int) -> dict[str, np.ndarray]:
    """Our adapter (`layers/<t>/lora_a` [L, in..., r], `lora_b` [L, r, out...]) as PEFT tensors:
    lora_A.weight [r, in_features], lora_B.weight [out_features, r] per layer."""
    out = {}
    for t, p in adapter["layers"].items():
        if "lora_a" not in p:
            continue
        a, b = np.asarray(p["lora_a"]), np.asarray(p["lora_b"])
        r = a.shape[-1]
        for i in range(n_layers):
            out[_PEFT_KEY.format(i=i, module=PEFT_MODULES[t], ab="A")] = np.ascontiguousarray(
                a[i].reshape(-1, r).T)
            out[_PEFT_KEY.format(i=i, module=PEFT_MODULES[t], ab="B")] = np.ascontiguousarray(
                b[i].reshape(r, -1).T)
    return out


def export_peft(src: str, dst: str, *, overwrite: bool = False, verify: bool = True) -> str:
    """Write a LoRA stage's adapter (work dir `src`) as a PEFT adapter directory:
    `adapter_config.json` + `adapter_model.safetensors`, loadable with
    `peft.PeftModel.from_pretrained(<the base as a Hugging Face model>, dst)`."""
    from safetensors.numpy import load_file, save_file

    clear = check_destination(dst, overwrite, keep=(src,))
    try:
        adapter, meta = checkpoint.load_stage_params(src)
    except UserError as e:
        raise UserError("--src", f"{e.where}: {e.what}", e.fix) from e
    spec = meta.get("lora")
    if not spec:
        raise UserError("--src", f"{src} is not a LoRA stage (no lora metadata)",
                        "train it with --config.lora.rank=<r>, or export the full model with "
                        "orbax-to-hf")
    cfg = models.ModelConfig.from_dict(dict(meta["model_config"]))
    _peft_model_type(cfg, "--src")
    extra = sorted(set(adapter) - {"layers"})
    if extra:
        log.warning("%s also trained %s (a score head): PEFT's causal-LM adapter leaves it out; "
                    "export the merged model (orbax-to-hf) to keep it", src, extra)
    tensors = peft_state_dict(adapter, cfg.n_layers)
    targets = [t for t in adapter["layers"] if "lora_a" in adapter["layers"][t]]
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(spec["rank"]),
        "lora_alpha": float(spec["alpha"]), "lora_dropout": float(spec.get("dropout", 0.0)),
        "target_modules": sorted(PEFT_MODULES[t].split(".")[-1] for t in targets),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": str(spec.get("base", "")),
    }
    if clear:
        _clear(dst)
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(dst, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(dst, PEFT_WEIGHTS), metadata={"format": "pt"})
    if verify:
        back = load_file(os.path.join(dst, PEFT_WEIGHTS))
        _check_same(tensors, back, "PEFT export", dst)
    print(f"wrote {dst}: LoRA rank {spec['rank']}, alpha {spec['alpha']}, "
          f"{len(tensors)} tensors on {','.join(config['target_modules'])}")
    return dst


def import_peft(base: str, src: str, dst: str, *, overwrite: bool = False) -> str:
    """A PEFT LoRA adapter directory `src` onto the base `base` (a stage work dir, hf:<dir> or
    zoo:<preset>) -> a LoRA stage in work dir `dst`, which stages load as base + adapter."""
    from safetensors.numpy import load_file

    from rlhf_jax import handoff

    clear = check_destination(dst, overwrite, keep=(src,))
    cfg_path = os.path.join(src, PEFT_CONFIG)
    if not os.path.exists(cfg_path):
        raise UserError("--src", f"{src} has no {PEFT_CONFIG}", "give a PEFT adapter directory")
    with open(cfg_path) as f:
        pc = json.load(f)
    if pc.get("peft_type", "LORA") != "LORA":
        raise UserError("--src", f"peft_type {pc.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(pc.get(key, ok)) != ok:
            raise UserError("--src", f"{key}={pc.get(key)} is not supported",
                            "export a plain LoRA adapter")
    if pc.get("bias", "none") != "none" or pc.get("modules_to_save"):
        raise UserError("--src", "adapters that also train biases or whole modules "
                        "(bias / modules_to_save) are not supported", "merge them in PEFT")
    if pc.get("rank_pattern") or pc.get("alpha_pattern"):
        raise UserError("--src", "per-module rank_pattern / alpha_pattern are not supported")
    loaded = handoff.resolve_init(base, field="--base")
    cfg = loaded.cfg
    _peft_model_type(cfg, "--base")
    weights = load_file(os.path.join(src, PEFT_WEIGHTS))
    r = int(pc["r"])
    scale = float(pc["lora_alpha"]) / (math.sqrt(r) if pc.get("use_rslora") else r)
    full_axes = models.abstract_params(cfg, ("lm",))["layers"]
    layers: dict = {}
    for t, module in PEFT_MODULES.items():
        key = lambda i, ab: _PEFT_KEY.format(i=i, module=module, ab=ab)  # noqa: E731
        present = [key(i, "A") in weights for i in range(cfg.n_layers)]
        if not any(present):
            continue
        if not all(present):
            raise UserError("--src", f"{module} has adapters on only some layers",
                            "adapters on every layer of a projection are supported")
        kshape = full_axes[t]["kernel"].shape[1:]
        n_in = lora.TARGET_IN_DIMS[t]
        ins, outs = kshape[:n_in], kshape[n_in:]
        a = np.stack([weights[key(i, "A")].T.reshape(*ins, r) for i in range(cfg.n_layers)])
        b = np.stack([weights[key(i, "B")].T.reshape(r, *outs) for i in range(cfg.n_layers)])
        dt = np.dtype(cfg.param_dtype)
        layers[t] = {"lora_a": a.astype(dt), "lora_b": b.astype(dt)}
    if not layers:
        raise UserError("--src", f"{PEFT_WEIGHTS} holds no adapter of a Llama-family projection",
                        f"expected keys like {_PEFT_KEY.format(i=0, module='self_attn.q_proj', ab='A')}")
    meta = dict(loaded.meta)
    meta.update(model_config=cfg.to_dict(), init_from=f"peft:{os.path.abspath(src)}",
                lora={"rank": r, "alpha": scale * r, "dropout": 0.0, "targets": sorted(layers),
                      "base": base if ":" in base else os.path.abspath(base)})
    if clear:
        _clear(dst)
    out = checkpoint.save_final(dst, {"layers": layers}, meta, step=0)
    print(f"wrote {out}: PEFT adapter (rank {r}, scale {scale:g}) on {sorted(layers)} over {base}")
    return str(out)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, verbose = errors.pop_verbose(["convert"] + argv)
    parser = errors.ArgumentParser(prog="python -m rlhf_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true",
                        help="print the traceback of an input error too")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-orbax", help="Hugging Face dir -> stage work dir (final/ params)")
    a.add_argument("--src", required=True, help="Hugging Face model directory (config.json + safetensors)")
    a.add_argument("--dst", required=True, help="work dir to create; later stages use init_from=DST")
    a.add_argument("--dtype", default="float32", choices=DTYPES + ("keep",),
                   help="parameter dtype to store (default float32 master weights; 'keep' = as in SRC)")
    b = sub.add_parser("orbax-to-hf", help="stage work dir -> Hugging Face dir")
    b.add_argument("--src", required=True, help="work dir of a finished stage (or hf-to-orbax output)")
    b.add_argument("--dst", required=True, help="directory to write config.json + model.safetensors to")
    b.add_argument("--dtype", default=None, choices=DTYPES, help="cast parameters (default: keep)")
    b.add_argument("--tokenizer-dir", default=None,
                   help="tokenizer to copy (default: the stage metadata's tokenizer_dir)")
    c = sub.add_parser("export-peft", help="LoRA stage work dir -> PEFT adapter dir")
    c.add_argument("--src", required=True, help="work dir of a LoRA stage (config.lora.rank > 0)")
    c.add_argument("--dst", required=True, help="directory for adapter_config.json + "
                   "adapter_model.safetensors")
    d = sub.add_parser("import-peft", help="PEFT adapter dir + base -> LoRA stage work dir")
    d.add_argument("--base", required=True, help="the adapter's base: a stage work dir, "
                   "hf:<dir> or zoo:<preset>")
    d.add_argument("--src", required=True, help="PEFT adapter directory")
    d.add_argument("--dst", required=True, help="work dir to create; later stages use "
                   "init_from=DST (base + adapter)")
    for p in (a, b, c, d):
        p.add_argument("--overwrite", action="store_true",
                       help="replace a non-empty --dst (it is deleted first)")
        p.add_argument("--no-verify", dest="verify", action="store_false",
                       help="skip reading the output back and comparing it bit for bit")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        args = parser.parse_args(argv[1:])
        if args.command == "export-peft":
            export_peft(args.src, args.dst, overwrite=args.overwrite, verify=args.verify)
        elif args.command == "import-peft":
            import_peft(args.base, args.src, args.dst, overwrite=args.overwrite)
        elif args.command == "hf-to-orbax":
            hf_to_orbax(args.src, args.dst, None if args.dtype == "keep" else args.dtype,
                        overwrite=args.overwrite, verify=args.verify)
        else:
            orbax_to_hf(args.src, args.dst, args.dtype, args.tokenizer_dir, args.verify,
                        overwrite=args.overwrite)
    except UserError as err:  # one line (with --verbose, the traceback first); exit status 2
        errors.print_user_error(err, verbose)
        return errors.EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
