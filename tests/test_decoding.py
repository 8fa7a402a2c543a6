"""Decoding modes (``Sampling.decoding``): static KV caches and compiled steps draw what the eager sampler draws."""

import pytest
import torch
from torch import nn
from transformers import DynamicCache, StaticCache

from lightning_ipa import Adapter, AdapterConfig, LocalBase, Sampling, TailoredPolicy
from lightning_ipa.policy import STATIC_CACHE_BLOCK
from lightning_ipa.types import Prompts

PROMPTS = ["Write one sentence that uses all of these words: dog, tree, run.", "A child", "The cat sleeps on the warm roof and"]


def policies(path: str, modes: list[str], controls: str = "", **sampling) -> list[TailoredPolicy]:
    """One policy per decoding mode over the same base and adapter (a non-trivial head)."""
    base = LocalBase(path, dtype="float32")
    adapter = Adapter.build(AdapterConfig(num_layers=2, head="zeros"), base)
    nn.init.normal_(adapter.head.weight, std=2.0, generator=torch.Generator().manual_seed(0))
    if controls:
        adapter.add_controls(3, controls)
    settings = {"max_new_tokens": 10, "top_p": 0.9, **sampling}
    return [TailoredPolicy(base, adapter, 1.0, Sampling(decoding=mode, **settings)) for mode in modes]


def assert_same_rollouts(a, b):
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    for field in ("logprobs", "ref_logprobs", "kl", "base_distribution", "hidden"):
        x, y = getattr(a, field), getattr(b, field)
        assert torch.allclose(x[x.isfinite()], y[y.isfinite()], atol=1e-4), field


class CacheKinds:
    """Records the cache class each forward of a model receives."""

    def __init__(self, module: nn.Module):
        self.kinds: list[type] = []
        module.register_forward_pre_hook(lambda _, args, kwargs: self.kinds.append(type(kwargs.get("cache"))), with_kwargs=True)


@pytest.mark.parametrize("controls", ["", "prefix", "every_token"])
def test_static_caches_draw_what_dynamic_caches_draw(tiny_llama, controls):
    eager, static = policies(tiny_llama, ["eager", "static"], controls)
    kinds = CacheKinds(static.base.lm.base_model), CacheKinds(static.adapter.body)
    prompts = eager.encode(PROMPTS)
    a = eager.sample(prompts, torch.Generator().manual_seed(5), samples_per_prompt=2)
    kinds[0].kinds.clear(), kinds[1].kinds.clear()
    b = static.sample(prompts, torch.Generator().manual_seed(5), samples_per_prompt=2)
    assert_same_rollouts(a, b)
    assert set(kinds[0].kinds) == set(kinds[1].kinds) == {StaticCache}  # both models, every step
    assert len(kinds[0].kinds) == int(b.response_mask.sum(-1).max())  # still one base forward per generated token
    generated = [p.generate(prompts, torch.Generator().manual_seed(6), use_adapter=False).response_ids for p in (eager, static)]
    assert torch.equal(*generated)


def test_auto_is_eager_on_cpu(tiny_llama):
    (auto,) = policies(tiny_llama, ["auto"])
    kinds = CacheKinds(auto.base.lm.base_model)
    auto.sample(auto.encode(PROMPTS[:1]), torch.Generator().manual_seed(0))
    assert auto.decoding(torch.device("cpu")) == "eager" and auto.decoding(torch.device("cuda")) == "compiled"
    assert set(kinds.kinds) <= {type(None), DynamicCache}


def test_a_static_cache_holds_prompt_and_response_in_blocks(tiny_llama):
    (static,) = policies(tiny_llama, ["static"], max_new_tokens=STATIC_CACHE_BLOCK)  # prompt + response: more than one block
    sizes = []
    static.base.lm.base_model.register_forward_pre_hook(lambda _, args, kwargs: sizes.append(kwargs["attention_mask"].shape[1]), with_kwargs=True)
    prompts = static.encode(PROMPTS)
    static.generate(prompts, torch.Generator().manual_seed(0), use_adapter=False)
    assert sizes[0] == prompts.ids.shape[1] and set(sizes[1:]) == {2 * STATIC_CACHE_BLOCK}  # one shape for every step
    with pytest.raises(ValueError, match=r"decoding must be one of \['auto', 'eager', 'static', 'compiled'\], got 'cuda_graphs'"):
        Sampling(decoding="cuda_graphs")


@pytest.mark.slow
def test_compiled_steps_draw_what_eager_steps_draw(tiny_llama):
    """torch.compile (inductor on CPU; CUDA graphs on CUDA) of each model's one-token step: same tokens, same numbers."""
    eager, compiled = policies(tiny_llama, ["eager", "compiled"], max_new_tokens=6)
    prompts = eager.encode(PROMPTS)
    a = eager.sample(prompts, torch.Generator().manual_seed(7), samples_per_prompt=2)
    b = compiled.sample(prompts, torch.Generator().manual_seed(7), samples_per_prompt=2)
    assert_same_rollouts(a, b)
    assert len(compiled.compiled) == 2  # base and adapter bodies, each compiled once
    with torch.no_grad():  # the adapter trains between rollouts: the compiled step reads its current weights
        for p in compiled.adapter.body.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    a = eager.sample(prompts, torch.Generator().manual_seed(8), samples_per_prompt=2)
    b = compiled.sample(prompts, torch.Generator().manual_seed(8), samples_per_prompt=2)
    assert_same_rollouts(a, b)
    # batches of other sizes (last batches, evaluation) and prompt widths: dynamo's limit of 8 entries, shared by every
    # transformers model's forward, would stop the 5th shape (fullgraph: a hard error); each still draws as eager does
    many = eager.encode(PROMPTS * 3)
    for rows in range(1, 9):
        few = Prompts(many.ids[:rows], many.mask[:rows])
        drawn = [policy.generate(few, torch.Generator().manual_seed(rows)).response_ids for policy in (eager, compiled)]
        assert torch.equal(*drawn), rows


def test_static_caches_of_sliding_window_layers_past_their_window(tmp_path):
    """A Gemma 3 whose sliding layers see 8 tokens, decoding 45: the static cache's sliding layers roll as the dynamic ones."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from tests.conftest import train_tokenizer

    tokenizer = train_tokenizer(400, ["<eos>", "<pad>"])
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=8, sliding_window=8, max_position_embeddings=256,
                              layer_types=["sliding_attention", "full_attention"] * 2, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    eager, static = policies(str(tmp_path), ["eager", "static"], max_new_tokens=20)
    prompts = eager.encode(["The quick brown fox jumps over the lazy dog", "Once"])
    assert prompts.ids.shape[1] + 20 > 2 * config.sliding_window
    a, b = (policy.sample(prompts, torch.Generator().manual_seed(2), samples_per_prompt=2) for policy in (eager, static))
    assert_same_rollouts(a, b)
