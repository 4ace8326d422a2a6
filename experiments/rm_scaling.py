"""RM accuracy against the number of comparisons (Stiennon et al. 2020, Fig. 6; Gao et al. 2022,
Fig. 6) on the simulated world.

    python -m experiments.rm_scaling [--config=configs/rm_scaling.py[:tiny]]

One RM per base-model size and label count (sweep trials in the shared stage directory), each
one epoch over that many K-wise rankings of the simulated annotators; held-out accuracy on the
same held-out rankings and the ceiling their noise allows (the noiseless gold's accuracy on the
same labels, `rm` stage's `gold_ceiling_accuracy`). Fits accuracy = a + b log2(comparisons) per
size (Stiennon et al.: about +1.1% per doubling of comparisons and +1.8% per doubling of RM
size) and tests: accuracy rises with comparisons; below ~2,000 comparisons RMs are near chance
(Gao et al.); the larger RM is more accurate on the same data; no RM passes the ceiling.

Writes `<workdir>/rm_scaling.png`, `.csv` (one row per RM), `.json` (fits, verdicts).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from experiments import lib

CLAIMS = ("held-out accuracy rises with the number of comparisons (log-linear)",
          "below ~2,000 comparisons reward models are near chance",
          "a larger RM is more accurate on the same comparisons",
          "no RM passes the ceiling set by the annotators' noise")


def sizes(config) -> list[str]:
    return [m.strip() for m in str(config.rm_models).split(",") if m.strip()]


def verdicts(points: list[dict], fits: dict, size_gain: dict) -> list[lib.Verdict]:
    def se(p):
        return float(np.sqrt(p["accuracy"] * (1 - p["accuracy"]) / max(p["held_out_pairs"], 1)))

    rises, text = True, []
    for model, f in fits.items():
        pts = sorted((p for p in points if p["model"] == model), key=lambda p: p["labels"])
        gain = pts[-1]["accuracy"] - pts[0]["accuracy"]
        ok = f["per_doubling"] > 0 and gain > 2 * np.hypot(se(pts[0]), se(pts[-1]))
        rises &= ok
        text.append(f"{model}: {100 * f['per_doubling']:+.1f}% per doubling, "
                    f"{pts[0]['accuracy']:.3f} at {pts[0]['labels']} -> {pts[-1]['accuracy']:.3f} "
                    f"at {pts[-1]['labels']}")
    v1 = lib.Verdict(CLAIMS[0], rises, "; ".join(text))
    # "Near chance": closer to 0.5 than to the ceiling.
    small = [p for p in points if p["labels"] < 2000]
    near = [p for p in small if p["accuracy"] - 0.5 < (p["ceiling"] - 0.5) / 2]
    v2 = lib.Verdict(CLAIMS[1], (len(near) == len(small)) if small else None, (
        f"{len(near)} of {len(small)} RMs under 2,000 comparisons are closer to 0.5 than to the "
        f"ceiling: " + ", ".join(f"{p['model']}/{p['labels']}: {p['accuracy']:.3f}"
                                 for p in small)) if small else "no RM under 2,000 comparisons")
    if size_gain:
        g = size_gain
        v3 = lib.Verdict(CLAIMS[2], g["mean_gain"] > 0 and g["wins"] > g["counts"] / 2,
                         f"{g['larger']} vs {g['smaller']}: {100 * g['mean_gain']:+.1f} points "
                         f"on average ({100 * g['per_doubling_of_params']:+.1f} per doubling of "
                         f"parameters), higher at {g['wins']} of {g['counts']} label counts")
    else:
        v3 = lib.Verdict(CLAIMS[2], None, "one model size only")
    over = [p for p in points if p["accuracy"] > p["ceiling"] + 2 * se(p)]
    best = max(p['accuracy'] for p in points)
    v4 = lib.Verdict(CLAIMS[3], not over, f"highest accuracy {best:.3f}"
                     f" vs ceiling {np.mean([p['ceiling'] for p in points]):.3f}"
                     + (f"; above it: {[(p['model'], p['labels']) for p in over]}" if over else ""))
    return [v1, v2, v3, v4]


def size_effect(points: list[dict]) -> dict:
    """Smallest vs largest model at every label count both have."""
    by = {}
    for p in points:
        by.setdefault(p["params"], {})[p["labels"]] = p
    if len(by) < 2:
        return {}
    lo, hi = by[min(by)], by[max(by)]
    common = sorted(set(lo) & set(hi))
    gains = [hi[n]["accuracy"] - lo[n]["accuracy"] for n in common]
    smaller, larger = lo[common[0]]["model"], hi[common[0]]["model"]
    return {"smaller": smaller, "larger": larger, "counts": len(common),
            "wins": int(sum(g > 0 for g in gains)), "mean_gain": float(np.mean(gains)),
            "per_doubling_of_params": float(np.mean(gains) / np.log2(max(by) / min(by)))}


def plot(points: list[dict], fits: dict, out: Path) -> Path:
    fig, (ax,) = lib.figure(1, 5.6, 3.9)
    for i, (model, f) in enumerate(fits.items()):
        pts = sorted((p for p in points if p["model"] == model), key=lambda p: p["labels"])
        n = np.array([p["labels"] for p in pts], float)
        acc = np.array([p["accuracy"] for p in pts])
        se = np.sqrt(acc * (1 - acc) / np.array([p["held_out_pairs"] for p in pts]))
        color = f"C{i}"
        ax.errorbar(n, acc, yerr=se, fmt="o-", ms=4, capsize=2, color=color,
                    label=f"{model} ({pts[0]['params'] / 1e6:.2f}M params)")
        ax.plot(n, f["intercept"] + f["per_doubling"] * np.log2(n), ls="--", lw=1, color=color)
    ceiling = float(np.mean([p["ceiling"] for p in points]))
    ax.axhline(ceiling, color="k", ls=":", lw=1.2,
               label=f"annotator-noise ceiling ({ceiling:.3f})")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("comparisons (K = 4 rankings) in training")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("RM accuracy vs data (Stiennon et al. 2020 Fig. 6)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return lib.save_figure(fig, out)


def run(config) -> dict:
    from rlhf_jax import models

    t0 = time.perf_counter()
    out = Path(config.workdir)
    out.mkdir(parents=True, exist_ok=True)
    st = lib.FigureStages(config)
    points = []
    for model in sizes(config):
        rows = [{"data.source.num_train": int(n), "data.source.judge": config.judge}
                for n in config.label_counts]
        for n, d in zip(config.label_counts, st.rms(rows, model)):
            s = lib.trial_summary({"workdir": d})
            points.append({
                "model": model, "params": models.param_count(models.preset(model), ("score",)),
                "labels": int(n), "pairs": int(n) * int(config.rm.data.source.k) *
                (int(config.rm.data.source.k) - 1) // 2,
                "accuracy": s["held_out_accuracy"], "ceiling": s["gold_ceiling_accuracy"],
                "held_out_pairs": s["held_out_pairs"], "train_seconds": s.get("train_seconds"),
                "workdir": str(d)})
    fits = {m: lib.fit_log_linear([p["labels"] for p in points if p["model"] == m],
                                  [p["accuracy"] for p in points if p["model"] == m])
            for m in sizes(config)}
    gain = size_effect(points)
    vs = verdicts(points, fits, gain)
    png = plot(points, fits, out / "rm_scaling.png")
    seconds = round(time.perf_counter() - t0, 1)
    lib.write_points(points, out / "rm_scaling.csv")
    summary = {"judge": config.judge, "fits": fits, "size_effect": gain,
               "stiennon_2020": {"per_doubling_of_comparisons": 0.011,
                                 "per_doubling_of_params": 0.018},
               "verdicts": [v.to_dict() for v in vs], "seconds": seconds, "png": str(png)}
    lib.write_json(summary, out / "rm_scaling.json")
    print("\n  model       labels   accuracy   ceiling")
    for p in points:
        print(f"  {p['model']:<10} {p['labels']:>7}   {p['accuracy']:.3f}      {p['ceiling']:.3f}")
    for m, f in fits.items():
        print(f"  fit {m}: accuracy = {f['intercept']:.3f} + {f['per_doubling']:.4f} log2(n)")
    lib.print_verdicts(f"Stiennon et al. 2020 Fig. 6 / Gao et al. 2022 Fig. 6 ({seconds:.0f} s):",
                       vs)
    return summary


DEFAULT_CONFIG = lib.ROOT / "configs" / "rm_scaling.py"

if __name__ == "__main__":
    lib.main(run, DEFAULT_CONFIG)
