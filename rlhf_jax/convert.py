"""Convert between Hugging Face checkpoints and rlhf_jax stage outputs (Orbax).

    python -m rlhf_jax.convert hf-to-orbax --src HF_DIR --dst WORKDIR [--dtype float32]
    python -m rlhf_jax.convert orbax-to-hf --src WORKDIR --dst HF_DIR [--dtype bfloat16]
                                           [--tokenizer-dir DIR] [--no-verify]

`hf-to-orbax` writes WORKDIR/final like a finished stage (params + metadata with `model_config`
and `tokenizer_dir`), so any stage can start from it with `--config.init_from=WORKDIR`.
`orbax-to-hf` exports a stage's final params to a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads; the tokenizer files are copied from
the stage's `tokenizer_dir` (or --tokenizer-dir) and its BOS/EOS/PAD ids written into
config.json. A score head (reward / value model) goes to `score_head.safetensors` beside it,
and a reward model's `reward_norm` (the gain/bias PPO applies to its scores) to
`reward_norm.json`; `hf-to-orbax` reads both back, so an exported RM scores the same after a
round trip.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import jax
import numpy as np

from rlhf_jax import checkpoint, models
from rlhf_jax.models import hf
from rlhf_jax.models.config import DTYPES

log = logging.getLogger(__name__)

# A reward model's score normalisation (stage metadata `reward_norm`), beside the score head.
REWARD_NORM_FILE = "reward_norm.json"

# Files that make a directory loadable by `AutoTokenizer.from_pretrained`.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _has_tokenizer(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES)


def _special_token_ids(tokenizer_dir: str) -> dict:
    """bos/eos/pad ids for config.json, so HF generation stops where our models stop."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = {f"{k}_token_id": getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad")}
    return {k: int(v) for k, v in ids.items() if v is not None}


def _summary(cfg: models.ModelConfig, params) -> str:
    heads = [h for h in ("lm_head", "score_head") if h in params]
    return (f"{cfg.hf_model_type or cfg.arch}: {models.param_count(params):,} params, "
            f"d_model={cfg.d_model}, n_layers={cfg.n_layers}, vocab={cfg.vocab_size}, "
            f"dtype={cfg.param_dtype}, tied={cfg.tie_embeddings}, heads={heads or ['(tied lm)']}")


def hf_to_orbax(src: str, dst: str, dtype: str | None = "float32") -> str:
    """Import a Hugging Face directory as a finished stage in work dir `dst`."""
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
            raise ValueError(f"{norm_path} must hold a JSON object with 'gain' and 'bias'")
        meta["reward_norm"] = norm
    if meta["tokenizer_dir"] is None:
        log.warning("%s has no tokenizer files; stages starting from %s need --config.tokenizer",
                    src, dst)
    out = checkpoint.save_final(dst, params, meta, step=0)
    print(f"wrote {out}: {_summary(cfg, params)}")
    return str(out)


def orbax_to_hf(src: str, dst: str, dtype: str | None = None, tokenizer_dir: str | None = None,
                verify: bool = True) -> str:
    """Export a finished stage's final params (work dir `src`) as a Hugging Face directory."""
    params, meta = checkpoint.load_stage_params(src)
    if "model_config" not in meta:
        raise ValueError(f"--src={src!r}: the stage metadata has no model_config "
                         "(was it written by an rlhf_jax stage or hf-to-orbax?)")
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
    tokenizer_dir = tokenizer_dir or meta.get("tokenizer_dir")
    extra = {}
    if tokenizer_dir:
        if not _has_tokenizer(tokenizer_dir):
            raise FileNotFoundError(f"tokenizer dir {tokenizer_dir!r} has none of {_TOKENIZER_FILES}; "
                                    "pass --tokenizer-dir")
        extra = _special_token_ids(tokenizer_dir)
    else:
        log.warning("no tokenizer_dir in %s's metadata and no --tokenizer-dir: exporting weights only", src)
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
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        back_flat = dict(jax.tree_util.tree_flatten_with_path(back)[0])
        if len(flat) != len(back_flat):
            raise RuntimeError(f"export check: {dst} holds {len(back_flat)} tensors, expected {len(flat)}")
        for path, x in flat:
            if not np.array_equal(np.asarray(x), np.asarray(back_flat[path])):
                raise RuntimeError(f"export check: {jax.tree_util.keystr(path)} changed on the way to {dst}")
    print(f"wrote {dst}: {_summary(cfg, params)}")
    return dst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
    b.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading the export back and comparing it bit for bit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "hf-to-orbax":
            hf_to_orbax(args.src, args.dst, None if args.dtype == "keep" else args.dtype)
        else:
            orbax_to_hf(args.src, args.dst, args.dtype, args.tokenizer_dir, args.verify)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
