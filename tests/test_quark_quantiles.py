"""Quark's reward quantiles against Quark's own rule.

Reference: GXimingLu/Quark ``data_pool.py`` ``DataPool.add`` (IPA's ``data_pool.py`` is the same code):
``sorted(data, key=score, reverse=True)`` (Python's sort is stable, so ties keep the pool's order, oldest
first), then ⌊N/n⌋ samples per quantile from the best down and the remainder in the worst, n − 1:

    cat_pos = [[i] * (len(sorted_data) // n) for i in range(n)]       # flattened
    cat_pos = cat_pos + [n - 1] * (len(sorted_data) - len(cat_pos))

Every literal below is what that code returns (run on the same scores, quantile read back by original
index), not a value derived from ours.
"""

import pytest
import torch

from lightning_ipa.algorithms.functional import reward_quantiles


@pytest.mark.parametrize(
    "rewards, n, quark",
    [
        # the example: 1 per quantile, the remainder (1) in the worst
        ([3.0, 2.0, 1.0], 2, [0, 1, 1]),
        # N = 7, n = 5: ⌊7/5⌋ = 1 each for quantiles 0..3 (6, 5, 4, 3), the worst takes 2, 1 and 0
        ([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 5, [4, 4, 4, 3, 2, 1, 0]),
        # N = 10, n = 4: 2 each (9 8 | 7 6 | 5 4 | 3 2), the worst also takes 1 and 0
        ([5.0, 3.0, 8.0, 1.0, 9.0, 2.0, 7.0, 4.0, 6.0, 0.0], 4, [2, 3, 0, 3, 0, 3, 1, 2, 1, 3]),
        # n divides N: ⌊N/n⌋ = N/n each, no remainder
        ([0.1, 0.9, 0.5, 0.3, 0.7, 0.5], 3, [2, 0, 1, 2, 0, 1]),
        ([0.2, 0.9, 0.4], 3, [2, 0, 1]),
        # N < n: ⌊N/n⌋ = 0, so no quantile but the worst gets a sample (quantile 0 is empty)
        ([0.2, 0.9, 0.4], 5, [4, 4, 4]),
        ([0.7], 5, [4]),
        # n = 1: everything in quantile 0
        ([0.3, 0.1, 0.2, 0.9], 1, [0, 0, 0, 0]),
        # ties: the stable sort keeps the pool's order, so the earlier of equal rewards ranks better
        ([0.5, 0.5, 0.5, 0.5, 0.5], 2, [0, 0, 1, 1, 1]),
        ([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0], 3, [0, 2, 0, 2, 1, 2, 1]),
    ],
)
def test_reward_quantiles_match_quarks_data_pool(rewards, n, quark):
    quantiles = reward_quantiles(torch.tensor(rewards), n)
    assert quantiles.dtype == torch.long and quantiles.shape == (len(rewards),)
    assert quantiles.tolist() == quark


def test_ties_across_rollouts_rank_the_older_sample_first():
    # Quark: DataPool.add([1, 1]) then DataPool.add([2, 1, 1]) with n = 2 → [0, 1, 0, 1, 1]: the pool is kept sorted
    # and new samples are appended before the stable sort, so older ties come first, as in our pool (oldest first).
    assert reward_quantiles(torch.tensor([1.0, 1.0, 2.0, 1.0, 1.0]), 2).tolist() == [0, 1, 0, 1, 1]


def test_each_quantile_holds_floor_n_over_quantiles_and_the_worst_the_rest():
    for size in range(1, 30):
        for n in range(1, 8):
            counts = torch.bincount(reward_quantiles(torch.randn(size), n), minlength=n).tolist()
            per = size // n
            assert counts == [per] * (n - 1) + [size - per * (n - 1)], (size, n)
