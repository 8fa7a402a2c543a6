import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from lightning_ipa.data import EpochShuffle, collate_prompts


def test_epoch_shuffle_depends_on_seed_and_pass_only():
    sampler = EpochShuffle(50, batch_size=5, seed=3)
    first = list(sampler)
    torch.rand(1000)  # what the model draws does not move the order
    assert list(EpochShuffle(50, batch_size=5, seed=3)) == first and sorted(first) == list(range(50))
    second = list(sampler)
    assert second != first and sorted(second) == list(range(50))
    resumed = EpochShuffle(50, batch_size=5, seed=3)
    resumed.load_state_dict({"passes": 1, "dealt": 50})  # a checkpoint taken after the first pass
    assert list(resumed) == second
    assert list(EpochShuffle(50, batch_size=5, seed=4)) != first


def test_epoch_shuffle_deals_whole_batches_to_each_process():
    permutation = list(EpochShuffle(23, batch_size=1, seed=0))
    assert list(EpochShuffle(23, batch_size=2, seed=0)) == permutation[:22]  # whole batches: 11 of 2
    shards = [list(EpochShuffle(23, batch_size=2, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [6, 6, 6]  # ⌊23 / 3⌋ = 7 prompts each → 3 batches of 2
    assert shards == [permutation[r:18:3] for r in range(3)]  # process r: every 3rd prompt of the permutation from the r-th
    assert len({i for s in shards for i in s}) == 18  # no prompt twice in a pass


def test_the_loader_resumes_mid_pass_where_it_stopped():
    prompts = [{"prompt": f"p{i}", "meta": {}} for i in range(10)]

    def loader(sampler: EpochShuffle) -> StatefulDataLoader:
        return StatefulDataLoader(prompts, batch_size=2, sampler=sampler, collate_fn=collate_prompts)

    straight = loader(EpochShuffle(10, 2, seed=1))
    batches = [b["prompt"] for _ in range(2) for b in straight]  # two passes
    stopped = loader(EpochShuffle(10, 2, seed=1))
    iterator = iter(stopped)
    seen = [next(iterator)["prompt"] for _ in range(3)]
    state = stopped.state_dict()  # after 3 of the 5 batches of the first pass
    resumed = loader(EpochShuffle(10, 2, seed=1))
    resumed.load_state_dict(state)
    rest = [b["prompt"] for b in resumed] + [b["prompt"] for b in resumed]
    assert seen + rest == batches
