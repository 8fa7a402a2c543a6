"""Every model family end to end: tiny Llama, GPT-2, Qwen2 and GPT-NeoX models (``model_families``), each with its own
tokenizer, through sampling, a ``fit`` step and ``predict``; and the cases where families differ: several stop ids (a chat
model ends its turn with a token that is not the tokenizer's EOS), context windows (GPT-2's learned positions end), and a
top-k base whose only token is EOS before ``min_new_tokens``.
"""

from __future__ import annotations

import math
import shutil
from typing import Optional

import pytest
import torch
from lightning import Trainer
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig

from lightning_ipa import RLOO, Adapter, AdapterConfig, IPAModule, LocalBase, PromptDataModule, Reward, Sampling, TailoredPolicy
from tests.model_families import CONTEXT, FAMILIES, Family

PROMPTS = ["The dog runs to the tree", "A child reads a book by the river.", "Le café est très bon", "中文的句子很短"]
LONG_WORDS = "the cat sleeps on the warm roof of the house and "


class Length(Reward):
    """reward = characters / 10: it differs between samples, so RLOO's advantages (and the update) are not 0."""

    def __call__(self, prompts, responses, meta):
        return {"reward": torch.tensor([len(r) / 10 for r in responses])}


class FixedPrompts(PromptDataModule):
    """The same prompts in every split."""

    def __init__(self, prompts: list[str], batch_size: int = 2, eval_batch_size: int = 4):
        super().__init__(batch_size, eval_batch_size)
        self.prompts = prompts

    def setup(self, stage: Optional[str] = None) -> None:
        items = [{"prompt": p, "meta": {}} for p in self.prompts]
        self.splits = {"train": items, "val": items, "predict": items}


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """``zoo(family, best_token=None)``: the folder of that family's tiny model (whose best next token is ``best_token``,
    if given), built once per session."""
    built: dict[tuple[str, Optional[str]], str] = {}

    def get(family: str, best_token: Optional[str] = None) -> str:
        if (family, best_token) not in built:
            built[family, best_token] = str(FAMILIES[family].save(tmp_path_factory.mktemp(family), best_token=best_token))
        return built[family, best_token]

    return get


@pytest.fixture(params=list(FAMILIES))
def family(request) -> Family:
    return FAMILIES[request.param]


def token(base: LocalBase, text: str) -> int:
    return base.tokenizer.get_vocab()[text]


def make_policy(path: str, family: Family, sampling: Sampling, alpha: float = 1.0, top_k: Optional[int] = None) -> TailoredPolicy:
    base = LocalBase(path, dtype="float32", chat_template=family.chat, top_k=top_k)
    return TailoredPolicy(base, Adapter.build(AdapterConfig(num_layers=1, head="zeros"), base), alpha, sampling)


def make_module(path: str, family: Family, sampling: Sampling, top_k: Optional[int] = None, **kwargs) -> IPAModule:
    base = LocalBase(path, dtype="float32", chat_template=family.chat, top_k=top_k)
    return IPAModule(base, Length(), RLOO(samples_per_prompt=2), adapter=AdapterConfig(num_layers=1), sampling=sampling, **kwargs)


def trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def long_prompt(base: LocalBase, tokens: int) -> str:
    """A prompt of more than ``tokens`` tokens, as ``base`` encodes it (with its chat template, if it uses one)."""
    text = LONG_WORDS
    while base.encode([text]).mask.sum() <= tokens:
        text += LONG_WORDS
    return text


# ---- sampling, fit and predict ----

def test_sampling_decodes_ends_at_stop_tokens_and_runs_the_base_once_per_token(zoo, family):
    policy = make_policy(zoo(family.name), family, Sampling(max_new_tokens=10, min_new_tokens=2))
    base = policy.base
    stops = torch.tensor(base.stop_ids)
    direction = torch.randn(policy.adapter.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # in some states the adapter wants to end the turn: some rows end, others run to max_new_tokens
        nn.init.normal_(policy.adapter.head.weight, std=0.5, generator=torch.Generator().manual_seed(1))
        policy.adapter.head.weight[token(base, family.end_of_turn)] = 2 * direction
    base.forward_count = 0
    rollout = policy.sample(policy.encode(PROMPTS), torch.Generator().manual_seed(0), samples_per_prompt=3)
    ids, mask = rollout.response_ids, rollout.response_mask
    assert base.forward_count == ids.shape[1]  # the prompt, then one incremental forward per token after the first
    assert torch.equal(mask, mask.cummin(-1).values)  # prefix masks: no hole after a real token
    lengths = mask.sum(-1)
    ended = policy.ended(ids, mask)
    assert ended.any() and (~ended).any()  # both kinds of row are exercised
    assert (lengths[~ended] == 10).all() and (lengths >= 3).all()  # cut at max_new_tokens; a stop never before min_new_tokens
    assert torch.isin(ids[ended, lengths[ended] - 1], stops).all()
    real = mask.bool()
    before_last = real & (torch.arange(ids.shape[1]) < (lengths - 1)[:, None])
    assert not torch.isin(ids[before_last], stops).any()  # nothing after a stop token
    assert (ids[~real] == policy.pad_id).all()
    if policy.pad_id not in base.stop_ids:
        assert not (ids[real] == policy.pad_id).any()  # padding is never sampled
    texts = policy.decode(ids, mask)
    assert len(texts) == len(ids) and all(isinstance(t, str) for t in texts) and any(texts)
    for text, row, keep in zip(texts, ids, real & ~torch.isin(ids, stops)):
        assert text == base.tokenizer.decode(row[keep], skip_special_tokens=True)
        assert not any(special in text for special in base.tokenizer.all_special_tokens)
    # the loss re-scores the very distribution that was sampled, without running the base again
    evaluated = policy(rollout, with_kl=True)
    assert torch.allclose(evaluated.logprobs, rollout.logprobs, atol=1e-4)
    assert torch.allclose(evaluated.kl, rollout.kl, atol=1e-4)
    assert base.forward_count == ids.shape[1]


def test_alpha_zero_greedy_decoding_matches_hf_generate(zoo, family):
    """The lockstep sampler with α = 0 and top-k 1 is HF greedy ``generate`` with the model's generation config: the same
    tokens for a left-padded batch (positions, caches, stop tokens and padding as HF has them for this family)."""
    path = zoo(family.name)
    policy = make_policy(path, family, Sampling(max_new_tokens=8, top_k=1), alpha=0.0)
    prompts = policy.encode(PROMPTS)
    assert (prompts.mask == 0).any()  # really left-padded
    ours = policy.generate(prompts, use_adapter=False)
    lm = AutoModelForCausalLM.from_pretrained(path)
    suppress = [] if policy.pad_id in policy.base.stop_ids else [policy.pad_id]  # the policy never samples padding
    theirs = lm.generate(prompts.ids, attention_mask=prompts.mask, do_sample=False, max_new_tokens=8, min_new_tokens=1,
                         pad_token_id=policy.pad_id, suppress_tokens=suppress or None)[:, prompts.ids.shape[1]:]
    assert torch.equal(ours.response_ids, theirs)


def test_fit_step_through_the_trainer(zoo, family):
    module = make_module(zoo(family.name), family, Sampling(max_new_tokens=6, temperature=2.0), missing_eos_penalty=0.1)
    projection = module.policy.adapter.head.projection.weight
    assert projection.abs().sum() == 0  # zero-initialised: the tailored policy starts at the base
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(module, datamodule=FixedPrompts(PROMPTS))
    assert fit.global_step == 1
    logged = fit.callback_metrics
    assert math.isfinite(logged["train/reward"]) and logged["train/kl"] == 0.0  # exact KL: 0 at the start
    assert projection.abs().sum() > 0  # one update of the adapter
    assert all(torch.isfinite(p).all() for p in module.policy.adapter.parameters())


def test_predict_gives_texts_of_both_policies(zoo, family):
    module = make_module(zoo(family.name), family, Sampling(max_new_tokens=6))
    batches = trainer().predict(module, datamodule=FixedPrompts(PROMPTS, eval_batch_size=3))
    rows = [row for batch in batches for row in batch]
    assert [row["prompt"] for row in rows] == PROMPTS
    for row in rows:
        assert isinstance(row["tailored"], str) and isinstance(row["base"], str)
        assert row["tailored"] == row["base"]  # the zero-initialised adapter: the same draws as the base alone
        assert math.isfinite(row["reward_tailored"])
    assert any(row["base"] for row in rows)


# ---- chat models with several stop ids ----

def test_stop_ids_are_the_families_own_and_can_be_overridden(zoo, family, tmp_path):
    path = zoo(family.name)
    base = LocalBase(path, dtype="float32", chat_template=family.chat)
    vocab = base.tokenizer.get_vocab()
    assert base.stop_ids == sorted(vocab[t] for t in family.stop_tokens)
    hf = base.lm.generation_config.eos_token_id  # what HF generate stops on
    assert set(base.stop_ids) == set(hf if isinstance(hf, list) else [hf]) | {base.tokenizer.eos_token_id}
    end = vocab[family.end_of_turn]
    assert LocalBase(path, dtype="float32", stop_tokens=[family.end_of_turn]).stop_ids == [end]
    assert LocalBase(path, dtype="float32", stop_tokens=[end, family.eos]).stop_ids == sorted({end, vocab[family.eos]})
    with pytest.raises(ValueError, match="not in the tokenizer's vocabulary"):
        LocalBase(path, dtype="float32", stop_tokens=["<|no such token|>"])
    # a chat template's end of turn stops a response even where the generation config lists EOS alone
    eos = base.tokenizer.eos_token_id
    eos_only = shutil.copytree(path, tmp_path / "eos_only")
    GenerationConfig(eos_token_id=eos).save_pretrained(eos_only)
    assert LocalBase(str(eos_only), dtype="float32", chat_template=family.chat).stop_ids == sorted({eos, end})
    assert LocalBase(str(eos_only), dtype="float32", chat_template=False).stop_ids == [eos]


STOPS = [(name, stop) for name, family in FAMILIES.items() for stop in family.stop_tokens]


@pytest.mark.parametrize("name,stop", STOPS, ids=[f"{name}-{stop}" for name, stop in STOPS])
def test_a_model_that_emits_a_stop_token_stops_there_as_hf_generate_does(zoo, name, stop):
    """A model whose best token is one of its stop tokens (Llama-3's ``<|eot_id|>``, Qwen2's ``<|im_end|>`` or its pad
    ``<|endoftext|>``, ...) ends the response with it, right after the ``min_new_tokens`` = 1 token before which stopping is
    banned, as HF ``generate`` with the model's generation config does: the response counts as ended (no
    ``missing_eos_penalty``) and its text leaves the stop token out."""
    family = FAMILIES[name]
    path = zoo(name, best_token=stop)
    module = make_module(path, family, Sampling(max_new_tokens=6, min_new_tokens=1), missing_eos_penalty=0.5)
    policy = module.policy
    stop_id = token(policy.base, stop)
    prompts = policy.encode(PROMPTS)
    rollout = policy.sample(prompts, torch.Generator().manual_seed(0))
    lm = AutoModelForCausalLM.from_pretrained(path)
    theirs = lm.generate(prompts.ids, attention_mask=prompts.mask, do_sample=False, max_new_tokens=6, min_new_tokens=1,
                         pad_token_id=policy.pad_id)[:, prompts.ids.shape[1]:]
    assert theirs.shape[1] == 2 and (theirs[:, 1] == stop_id).all()  # HF: one token, then the stop token
    assert rollout.response_ids.shape[1] == 2 and rollout.response_mask.all()
    assert (rollout.response_ids[:, 1] == stop_id).all()
    assert not torch.isin(rollout.response_ids[:, 0], torch.tensor(policy.base.stop_ids)).any()
    assert module.ended(rollout).all()
    reward = torch.ones(len(PROMPTS))
    assert torch.equal(module.shaped_reward(rollout, reward), reward)  # ended: no missing-EOS penalty
    texts = module.decode(rollout)
    tokenizer = policy.base.tokenizer
    assert texts == [tokenizer.decode(row[:1], skip_special_tokens=True) for row in rollout.response_ids]
    assert not any(stop in text for text in texts)


# ---- context windows ----

@pytest.mark.parametrize("long_prompts", ["refuse", "cut_left"])
def test_a_prompt_longer_than_the_window_is_cut_or_refused(zoo, family, long_prompts):
    """A prompt with more than window − max_new_tokens tokens (GPT-2's learned positions raised IndexError past the
    window; rotary families silently read past theirs): refused with a ValueError naming the limit, or its first tokens
    dropped so that prompt and response fit the window."""
    policy = make_policy(zoo(family.name), family, Sampling(max_new_tokens=12, min_new_tokens=12, long_prompts=long_prompts))
    window = CONTEXT  # n_positions for GPT-2, max_position_embeddings for the others
    room = window - 12
    assert policy.base.max_positions == window and policy.context_window() == room
    long, short = long_prompt(policy.base, room), PROMPTS[1]
    full = policy.base.encode([long, short])
    if long_prompts == "refuse":
        with pytest.raises(ValueError, match=rf"longer than the {room} tokens .*#0: {int(full.mask[0].sum())} tokens"):
            policy.encode([long, short])
        return
    with pytest.warns(UserWarning, match="cut from the left"):
        prompts = policy.encode([long, short])
    assert policy.prompts_cut == 1 and prompts.ids.shape[1] <= room
    kept, whole = prompts.ids[0][prompts.mask[0].bool()], full.ids[0][full.mask[0].bool()]
    # the text's first tokens go; BOS or the chat template's opening stays, and the end (text and template) is whole
    assert torch.equal(kept[-10:], whole[-10:]) and len(kept) < len(whole)
    if family.chat or whole[0] == policy.base.tokenizer.bos_token_id:
        assert kept[0] == whole[0]
    short_ids = full.ids[1][full.mask[1].bool()]
    assert torch.equal(prompts.ids[1][prompts.mask[1].bool()], short_ids)  # the short one whole
    rollout = policy.sample(prompts, torch.Generator().manual_seed(0))
    assert rollout.prompt_ids.shape[1] + rollout.response_ids.shape[1] <= window
    assert torch.allclose(policy(rollout).logprobs, rollout.logprobs, atol=1e-4)  # the loss's pass fits too


def test_a_fit_step_cuts_long_prompts_and_logs_the_count(zoo, family):
    module = make_module(zoo(family.name), family, Sampling(max_new_tokens=12, min_new_tokens=12, long_prompts="cut_left"))
    base = module.policy.base
    long = long_prompt(base, module.policy.context_window())
    read, forward = [], base.forward
    base.forward = lambda ids, mask, positions, cache=None: (read.append(mask.shape[1]), forward(ids, mask, positions, cache))[1]
    fit = trainer(max_steps=1, limit_val_batches=0)
    with pytest.warns(UserWarning, match="cut from the left"):
        fit.fit(module, datamodule=FixedPrompts([long, PROMPTS[0]]))  # one batch: both prompts
    assert fit.global_step == 1 and fit.callback_metrics["train/prompts_cut"] == 1.0
    assert max(read) == CONTEXT - 1  # the window, less the last token (sampled, never read)


def test_a_run_refuses_long_prompts_before_any_work(zoo, family):
    module = make_module(zoo(family.name), family, Sampling(max_new_tokens=12))
    long = long_prompt(module.policy.base, module.policy.context_window())
    module.policy.base.forward_count = 0
    with pytest.raises(ValueError, match=r"the 'predict' split .* longer than"):
        trainer().predict(module, datamodule=FixedPrompts([PROMPTS[0], long]))
    assert module.policy.base.forward_count == 0


# ---- a top-k base whose only token is EOS ----

def test_a_top_k_base_whose_support_is_eos_alone_ends_instead_of_failing(zoo, family):
    """``LocalBase(top_k=1)`` (an API base's support) on a model whose best token is EOS, with min_new_tokens =
    max_new_tokens: banning EOS would leave no token to sample ("probability tensor contains inf, nan"); the ban gives
    way and the response is EOS, in sampling and in the loss alike."""
    policy = make_policy(zoo(family.name, best_token=family.eos), family, Sampling(max_new_tokens=4, min_new_tokens=4), top_k=1)
    nn.init.normal_(policy.adapter.head.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    eos = token(policy.base, family.eos)
    rollout = policy.sample(policy.encode(PROMPTS), torch.Generator().manual_seed(0))
    assert (rollout.response_ids[:, 0] == eos).all() and rollout.response_ids.shape[1] == 1
    assert policy.ended(rollout.response_ids, rollout.response_mask).all()
    assert torch.equal(rollout.logprobs, torch.zeros_like(rollout.logprobs))  # the whole support: probability 1
    evaluated = policy(rollout, with_kl=True)
    assert torch.allclose(evaluated.logprobs, rollout.logprobs, atol=1e-5)
    assert torch.isfinite(evaluated.entropy).all() and torch.isfinite(evaluated.kl).all() and torch.isfinite(rollout.kl).all()


def test_a_fit_step_with_that_base_is_finite(zoo, family):
    module = make_module(zoo(family.name, best_token=family.eos), family, Sampling(max_new_tokens=3, min_new_tokens=3), top_k=1)
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(module, datamodule=FixedPrompts(PROMPTS))  # a non-finite loss would raise FloatingPointError
    assert fit.global_step == 1 and math.isfinite(fit.callback_metrics["train/reward"])


def test_static_kv_caches_draw_what_dynamic_ones_draw(family, zoo):
    """``Sampling.decoding='static'`` (transformers' StaticCache for base and adapter) in every family: same tokens."""
    base = LocalBase(zoo(family.name), dtype="float32")
    adapter = Adapter.build(AdapterConfig(num_layers=1, head="zeros"), base)
    nn.init.normal_(adapter.head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    policies = [TailoredPolicy(base, adapter, 1.0, Sampling(max_new_tokens=8, top_p=0.9, decoding=mode)) for mode in ("eager", "static")]
    prompts = policies[0].encode(PROMPTS)
    eager, static = (policy.sample(prompts, torch.Generator().manual_seed(1), samples_per_prompt=2) for policy in policies)
    assert torch.equal(eager.response_ids, static.response_ids) and torch.equal(eager.response_mask, static.response_mask)
    assert torch.allclose(eager.logprobs, static.logprobs, atol=1e-4) and torch.allclose(eager.kl, static.kl, atol=1e-4)


@pytest.mark.parametrize("family, config", [
    ("gemma2", {"final_logit_softcapping": 2.0}),  # Gemma 2: cap · tanh(logits / cap)
    ("cohere", {"logit_scale": 0.25}),  # Cohere: logits × logit_scale
    ("granite", {"logits_scaling": 4.0}),  # Granite: logits ÷ logits_scaling
])
def test_the_base_distribution_is_the_families_own_forward_scalings_included(tmp_path, family, config):
    """``LocalBase`` reads the base's log-probs from its body and head: a family whose forward scales the head's logits
    (softcapping, a logit scale) gets them scaled as its own forward does; sampling then draws what HF generate draws."""
    import transformers
    from transformers import GenerationConfig

    from tests.conftest import train_tokenizer

    tokenizer = train_tokenizer(300, ["<eos>", "<pad>"])
    name = {"gemma2": "Gemma2", "cohere": "Cohere", "granite": "Granite"}[family]
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(getattr(transformers, f"{name}Config")(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config))
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, 1.0)
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    base = LocalBase(str(tmp_path / family), dtype="float32")
    prompts = base.encode(PROMPTS)
    ours, _ = base(prompts.ids, prompts.mask, (prompts.mask.cumsum(-1) - 1).clamp(min=0))
    reference = model(input_ids=prompts.ids, attention_mask=prompts.mask).logits[:, -1].log_softmax(-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    policy = TailoredPolicy(base, None, sampling=Sampling(max_new_tokens=6, top_p=0.9))
    config = GenerationConfig(do_sample=True, top_k=0, top_p=0.9, max_new_tokens=6, eos_token_id=base.stop_ids, pad_token_id=policy.pad_id)
    for seed in range(3):
        drawn = policy.generate(prompts, torch.Generator().manual_seed(seed))
        torch.manual_seed(seed)
        theirs = model.generate(input_ids=prompts.ids, attention_mask=prompts.mask, generation_config=config)[:, prompts.ids.shape[1]:]
        assert torch.equal(theirs, drawn.response_ids.masked_fill(drawn.response_mask == 0, policy.pad_id)[:, : theirs.shape[1]])


def test_a_family_whose_logits_are_made_otherwise_is_refused_at_load(tmp_path):
    """A forward that scales its logits in a way ``output_logits`` does not know (here: a Llama whose config claims
    Granite's ``logits_scaling``, which Llama's forward ignores) is refused when the base loads, not sampled wrongly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import train_tokenizer

    tokenizer = train_tokenizer(300, ["<eos>", "<pad>"])
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 eos_token_id=tokenizer.eos_token_id, logits_scaling=8.0)).save_pretrained(tmp_path / "odd")
    tokenizer.save_pretrained(tmp_path / "odd")
    with pytest.raises(ValueError, match=r"llama: the model's forward turns its last hidden state into logits otherwise"):
        LocalBase(str(tmp_path / "odd"), dtype="float32")
