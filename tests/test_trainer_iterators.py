"""ArrayIterator: epoch permutations, exact resume, per-process slices."""

import itertools

import numpy as np
import pytest

from rlhf_jax.data.iterators import ArrayIterator


def _data(n=10):
    return {"x": np.arange(n), "y": np.arange(n) * 10}


def _it(**kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return ArrayIterator(_data(kw.pop("n", 10)), **kw)


def test_each_epoch_is_a_fresh_permutation_of_all_rows():
    it = _it(batch_size=5, seed=3)
    epochs = [np.concatenate([next(it)["x"] for _ in range(2)]) for _ in range(4)]
    for e in epochs:
        assert sorted(e) == list(range(10))
    assert len({tuple(e) for e in epochs}) == 4  # no epoch repeats an earlier order
    b = next(_it(batch_size=5, seed=3))
    np.testing.assert_array_equal(b["y"], b["x"] * 10)  # fields stay aligned
    assert not np.array_equal(next(_it(batch_size=5, seed=4))["x"], epochs[0][:5])
    np.testing.assert_array_equal(next(_it(batch_size=5, seed=3, shuffle=False))["x"], range(5))


def test_drop_remainder_and_num_epochs():
    it = _it(batch_size=4, seed=0, drop_remainder=True)
    sizes = [len(next(it)["x"]) for _ in range(5)]
    assert sizes == [4, 4, 4, 4, 4] and it.epoch == 2  # 2 full batches per epoch, rows 8-9 dropped
    it = _it(batch_size=4, seed=0, drop_remainder=False, num_epochs=2)
    batches = list(it)
    assert [len(b["x"]) for b in batches] == [4, 4, 2, 4, 4, 2]
    assert sorted(np.concatenate([b["x"] for b in batches[:3]])) == list(range(10))


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 7])
def test_state_round_trip_resumes_at_the_first_unseen_batch(consumed):
    ref = _it(batch_size=4, seed=1)
    stream = [next(ref)["x"] for _ in range(consumed + 4)]
    it = _it(batch_size=4, seed=1)
    for _ in range(consumed):
        next(it)
    state = it.get_state()
    fresh = _it(batch_size=4, seed=1)
    fresh.set_state(state)
    for want in stream[consumed:]:
        np.testing.assert_array_equal(next(fresh)["x"], want)


def test_set_state_rejects_foreign_states():
    it = _it(batch_size=4, seed=1)
    with pytest.raises(ValueError, match="seed 2"):
        it.set_state({"epoch": 0, "position": 4, "seed": 2})
    with pytest.raises(ValueError, match="position 40 is past the 10 rows"):
        it.set_state({"epoch": 0, "position": 40})
    with pytest.raises(ValueError, match="'epoch'"):
        it.set_state({"position": 4})


def test_processes_split_each_global_batch():
    single = _it(n=24, batch_size=8, seed=5)
    procs = [_it(n=24, batch_size=8, seed=5, process_index=i, process_count=2) for i in range(2)]
    for _ in range(7):  # crosses epoch boundaries
        whole = next(single)["x"]
        parts = [next(p)["x"] for p in procs]
        assert [len(p) for p in parts] == [4, 4]
        np.testing.assert_array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        _it(n=24, batch_size=8, process_index=0, process_count=3)


def test_bad_arrays_are_named():
    with pytest.raises(ValueError, match="'y' has 3 rows, others have 4"):
        ArrayIterator({"x": np.zeros(4), "y": np.zeros(3)}, 2, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="4 rows of data cannot fill one batch of 8"):
        ArrayIterator({"x": np.zeros(4)}, 8, process_index=0, process_count=1)


def test_defaults_to_jax_process_layout():
    it = ArrayIterator(_data(), 2)
    assert (it.process_index, it.process_count) == (0, 1)
    assert len(list(itertools.islice(it, 3))) == 3
