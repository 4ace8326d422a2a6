"""Best-of-n math against plain references: brute-force enumeration of every n-subset (with proxy
ties), seeded bootstrap SEs, KL_bon against Monte-Carlo simulation of the best-of-n policy, the
empirical KL with and without repeated outputs, and the CSV / PNG writer."""

from __future__ import annotations

import csv
import itertools

import numpy as np
import pytest

from rlhf_jax import bon
from rlhf_jax.errors import UserError


def _brute_force(proxy_row, values_row, n):
    """Mean over all n-subsets of the value of the proxy-best member (ties: uniform choice)."""
    total, count = 0.0, 0
    for subset in itertools.combinations(range(len(proxy_row)), n):
        best = max(proxy_row[i] for i in subset)
        winners = [i for i in subset if proxy_row[i] == best]
        total += np.mean([values_row[i] for i in winners])
        count += 1
    return total / count


def test_estimator_equals_brute_force_enumeration_with_ties():
    rng = np.random.default_rng(0)
    P, N = 4, 8
    proxy = rng.integers(0, 4, size=(P, N)).astype(np.float64)  # many ties
    proxy[3] = rng.normal(size=N)  # and one prompt without ties
    gold = rng.normal(size=(P, N))
    ns = [1, 2, 3, 5, 8]
    est_gold = bon.expected_best_of_n(proxy, gold, ns)
    est_proxy = bon.expected_best_of_n(proxy, proxy, ns)
    for p in range(P):
        for j, n in enumerate(ns):
            assert est_gold[p, j] == pytest.approx(_brute_force(proxy[p], gold[p], n), abs=1e-12)
            assert est_proxy[p, j] == pytest.approx(_brute_force(proxy[p], proxy[p], n),
                                                    abs=1e-12)
    # n = 1 is the plain mean, n = N the tie-averaged value at the maximum.
    np.testing.assert_allclose(est_gold[:, 0], gold.mean(1))
    # Without the tie rule (plain stable sort) the answer would depend on sample order.
    order = np.argsort(proxy[0], kind="stable")
    naive = bon.bon_weights(N, ns) @ gold[0][order]
    assert np.abs(naive - est_gold[0]).max() > 1e-3
    # ... while the estimator does not.
    perm = rng.permutation(N)
    np.testing.assert_allclose(bon.expected_best_of_n(proxy[:, perm], gold[:, perm], ns),
                               est_gold, atol=1e-12)


def test_weights_rows_sum_to_one_and_best_of_n_indices():
    W = bon.bon_weights(8)
    np.testing.assert_allclose(W.sum(1), 1.0)
    assert W[0].tolist() == pytest.approx([1 / 8] * 8) and W[-1].tolist() == [0] * 7 + [1]
    assert bon.best_of_n_indices(np.array([[1.0, 3.0, 3.0], [0.0, -1.0, -2.0]])).tolist() == [1, 0]
    with pytest.raises(UserError, match="config.bon.ns"):
        bon.bon_weights(8, [0, 9])


def test_bootstrap_se_is_seeded_and_shrinks_with_prompts():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1600, 3))
    se_small = bon.bootstrap_se(x[:25], seed=3)
    assert np.array_equal(se_small, bon.bootstrap_se(x[:25], seed=3))
    assert not np.array_equal(se_small, bon.bootstrap_se(x[:25], seed=4))
    se_big = bon.bootstrap_se(x, seed=3)
    assert np.all(se_big < se_small / 4)  # 64x the prompts: ~8x smaller
    np.testing.assert_allclose(se_big, x.std(0) / np.sqrt(len(x)), rtol=0.15)
    assert np.all(np.isnan(bon.bootstrap_se(x[:1])))


def _simulate_bon(probs, proxy, n, draws, rng):
    """Monte Carlo: draw n outputs, keep the proxy-best (first among equals: the draws are
    i.i.d., so that is a uniform tie-break); return the best-of-n output frequencies."""
    ys = rng.choice(len(probs), size=(draws, n), p=probs)
    best = ys[np.arange(draws), np.argmax(proxy[ys], axis=1)]
    return np.bincount(best, minlength=len(probs)) / draws


def _plug_in_kl(freq, probs):
    on = freq > 0
    return float(np.sum(freq[on] * np.log(freq[on] / probs[on])))


@pytest.mark.parametrize("n", [2, 4, 8])
def test_kl_bon_exact_against_monte_carlo_on_a_small_categorical(n):
    """Five outputs, continuous proxy scores (two of them tied): simulated best-of-n matches the
    exact discrete KL, which sits below the formula log n - (n-1)/n (outputs repeat)."""
    rng = np.random.default_rng(n)
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    proxy = np.array([0.31, -1.2, 0.31, 2.05, 0.7])
    freq = _simulate_bon(probs, proxy, n, 400_000, rng)
    exact = bon.bon_kl_discrete(probs, proxy, n)
    assert _plug_in_kl(freq, probs) == pytest.approx(exact, abs=6e-3)
    assert exact < bon.kl_bon(n) - 0.02


@pytest.mark.parametrize("n", [2, 4, 16])
def test_kl_bon_formula_against_monte_carlo_when_outputs_rarely_repeat(n):
    """2000 equally likely outputs with distinct proxies: simulated best-of-n's KL (a plug-in
    over 6 x 10^5 draws, bias ~ 2000 / 1.2e6) agrees with log n - (n-1)/n."""
    rng = np.random.default_rng(10 + n)
    M = 2000
    probs = np.full(M, 1.0 / M)
    proxy = rng.normal(size=M)
    freq = _simulate_bon(probs, proxy, n, 600_000, rng)
    assert _plug_in_kl(freq, probs) == pytest.approx(float(bon.kl_bon(n)), abs=0.01)
    assert float(bon.bon_kl_discrete(probs, proxy, n)) == pytest.approx(float(bon.kl_bon(n)),
                                                                         abs=1e-4)


def test_empirical_kl_near_formula_without_repeats_and_below_with_repeats():
    rng = np.random.default_rng(5)
    P, N, ns = 8, 512, [1, 2, 4, 8, 16]
    # Continuous outputs: no sample repeats, the empirical KL approaches the formula from below.
    proxy = rng.normal(size=(P, N))
    ids = [[("prompt", p, j) for j in range(N)] for p in range(P)]
    emp = bon.bon_kl_empirical(ids, proxy, ns)
    assert np.all(emp <= bon.kl_bon(ns) + 1e-12)
    np.testing.assert_allclose(emp, np.broadcast_to(bon.kl_bon(ns), emp.shape), atol=1e-3)
    # A small categorical: outputs repeat, so the data show a KL well below the formula and close
    # to the exact KL of best-of-n from that categorical.
    probs = np.array([0.4, 0.25, 0.2, 0.1, 0.05])
    out_proxy = np.array([0.31, -1.2, 0.5, 2.05, 0.7])
    ys = rng.choice(5, size=(P, N), p=probs)
    emp = bon.bon_kl_empirical(ys.tolist(), out_proxy[ys], ns)
    exact = bon.bon_kl_discrete(probs, out_proxy, ns)
    assert np.all(emp.mean(0)[1:] < bon.kl_bon(ns)[1:])
    assert bon.kl_bon(16) - emp.mean(0)[-1] > 0.1
    np.testing.assert_allclose(emp.mean(0), exact, atol=0.08)


def test_curves_written_as_csv_and_png(tmp_path):
    rng = np.random.default_rng(6)
    P, N = 30, 16
    proxy = rng.normal(size=(P, N))
    gold = 0.5 * proxy + rng.normal(size=(P, N))
    ids = [[int(v) for v in rng.integers(0, 40, size=N)] for _ in range(P)]
    rows = bon.bon_curves(proxy, gold, output_ids=ids, n_boot=200, seed=0)
    assert [r["n"] for r in rows] == list(range(1, N + 1))
    gold_curve = [r["gold"] for r in rows]
    assert gold_curve[-1] > gold_curve[0] and rows[-1]["proxy"] > rows[0]["proxy"]
    paths = bon.write_curves(rows, str(tmp_path / "out"))
    with open(paths["csv"]) as f:
        back = list(csv.DictReader(f))
    assert len(back) == N and tuple(back[0]) == bon.CSV_FIELDS
    assert float(back[3]["gold"]) == pytest.approx(rows[3]["gold"])
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(UserError, match="already exists"):
        bon.write_curves(rows, str(tmp_path / "out"))
    bon.write_curves(rows, str(tmp_path / "out"), overwrite=True)
