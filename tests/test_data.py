import torch

from lightning_ipa.data import EpochShuffle


def test_epoch_shuffle_depends_on_seed_and_pass_only():
    sampler = EpochShuffle(50, seed=3)
    first = list(sampler)
    torch.rand(1000)  # what the model draws does not move the order
    assert list(EpochShuffle(50, seed=3)) == first and sorted(first) == list(range(50))
    second = list(sampler)
    assert second != first and sorted(second) == list(range(50))
    assert list(EpochShuffle(50, seed=3, passes=1)) == second  # a resumed run continues with the next pass
    assert list(EpochShuffle(50, seed=4)) != first
