"""Real models' stop-token sets, context windows and supports that bans would empty (issue 18)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from lightning import Trainer
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from lightning_ipa import Adapter, AdapterConfig, IPAModule, LocalBase, Perplexity, Sampling, TailoredPolicy
from lightning_ipa.bases import stop_ids
from lightning_ipa.evaluation import sliding_windows
from lightning_ipa.rewards import Reward
from lightning_ipa.types import position_ids
from tasks.quickstart.data import ConceptsDataModule
from tests.conftest import train_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<eot>{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def save_chat_llama(path: Path) -> Path:
    """A tiny Llama chat model as Llama-3 ships one: turns end with <eot>, and generation_config.eos_token_id = [<eos>, <eot>]."""
    tokenizer = train_tokenizer(400, ["<eos>", "<pad>", "<eot>", "<|start|>"])
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<eot>")],
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_llama(tmp_path_factory) -> str:
    return str(save_chat_llama(tmp_path_factory.mktemp("chat_llama")))


def favour(lm: nn.Module, token_id: int, logit: float = 100.0) -> None:
    """Make ``token_id`` the model's best next token everywhere: its output head gets a bias (weights shared)."""
    head = lm.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[token_id] = logit
    lm.set_output_embeddings(biased)


def policy_over(base: LocalBase, alpha: float = 1.0, **sampling) -> TailoredPolicy:
    return TailoredPolicy(base, Adapter.build(AdapterConfig(num_layers=1, head="zeros"), base), alpha, Sampling(**sampling))


# ---- 1. the set of stop ids ----

def test_stop_ids_come_from_eos_the_generation_config_and_the_chat_templates_end_of_turn(chat_llama):
    plain = LocalBase(chat_llama, dtype="float32")
    tokenizer = plain.tokenizer
    eos, eot, start = (tokenizer.convert_tokens_to_ids(t) for t in ("<eos>", "<eot>", "<|start|>"))
    assert plain.stop_ids == sorted([eos, eot])  # generation_config.eos_token_id lists both
    assert start not in plain.stop_ids
    assert LocalBase(chat_llama, dtype="float32", stop_tokens=["<eot>"]).stop_ids == [eot]  # the config overrides
    assert LocalBase(chat_llama, dtype="float32", stop_tokens=[eos, "<eot>"]).stop_ids == sorted([eos, eot])
    with pytest.raises(ValueError, match=r"\['<end>'\] not in the tokenizer's vocabulary"):
        LocalBase(chat_llama, dtype="float32", stop_tokens=["<end>"])


def test_the_chat_templates_end_of_turn_is_a_stop_token(tiny_llama, tmp_path):
    """A model whose generation config names EOS only still stops at its chat template's end of turn."""
    base = LocalBase(tiny_llama, dtype="float32")
    tokenizer = base.tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end_turn|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE.replace("<eot>", "<|end_turn|>")
    tokenizer.save_pretrained(tmp_path)
    base.lm.resize_token_embeddings(len(tokenizer))
    base.lm.save_pretrained(tmp_path)
    end = tokenizer.convert_tokens_to_ids("<|end_turn|>")
    assert LocalBase(str(tmp_path), dtype="float32", chat_template=True).stop_ids == sorted([tokenizer.eos_token_id, end])
    assert LocalBase(str(tmp_path), dtype="float32").stop_ids == [tokenizer.eos_token_id]  # no template, no end of turn


def test_sampling_stops_at_any_stop_id_as_hf_generate_does(chat_llama):
    base = LocalBase(chat_llama, dtype="float32")
    eot = base.tokenizer.convert_tokens_to_ids("<eot>")
    favour(base.lm, eot)
    policy = policy_over(base, max_new_tokens=8, min_new_tokens=1)
    prompts = base.encode(["The dog runs", "A child reads a book"])
    rollout = policy.sample(prompts, torch.Generator().manual_seed(0))
    hf = base.lm.generate(prompts.ids, attention_mask=prompts.mask, do_sample=True, max_new_tokens=8, min_new_tokens=1, top_k=0,
                          suppress_tokens=[base.tokenizer.pad_token_id])[:, prompts.ids.shape[1]:]
    assert hf.shape[1] == 2 and (hf[:, 1] == eot).all()  # HF generate stops at <eot>, the first token it may stop with
    assert rollout.response_ids.shape[1] == 2 and (rollout.response_ids[:, 1] == eot).all() and rollout.response_mask.all()
    assert policy.ended(rollout.response_ids, rollout.response_mask).all()
    assert policy.decode(rollout.response_ids, rollout.response_mask) == base.tokenizer.batch_decode(rollout.response_ids[:, :1])
    module = IPAModule(base, Constant(), missing_eos_penalty=1.0)
    module.policy = policy
    assert module.shaped_reward(rollout, torch.zeros(2)).tolist() == [0.0, 0.0]  # ended: no penalty


def test_a_stop_token_that_is_not_special_stays_in_the_text_as_hf_generate_and_vllm_give_it(chat_llama):
    base = LocalBase(chat_llama, dtype="float32", stop_tokens=["."])
    dot = base.tokenizer.convert_tokens_to_ids(".")
    favour(base.lm, dot)
    policy = policy_over(base, alpha=0.0, max_new_tokens=6)
    prompts = base.encode(["The dog runs"])
    torch.manual_seed(3)
    rollout = policy.sample(prompts)
    torch.manual_seed(3)
    hf = base.lm.generate(prompts.ids, attention_mask=prompts.mask, do_sample=True, top_k=0, max_new_tokens=6, min_new_tokens=1,
                          eos_token_id=[dot], suppress_tokens=[base.tokenizer.pad_token_id])[:, prompts.ids.shape[1]:]
    assert torch.equal(rollout.response_ids, hf) and hf[0, -1] == dot
    text = policy.decode(rollout.response_ids, rollout.response_mask)[0]
    assert text == base.tokenizer.decode(hf[0], skip_special_tokens=True) and text.endswith(".")


def test_min_new_tokens_bans_every_stop_id(chat_llama):
    base = LocalBase(chat_llama, dtype="float32")
    eos, eot = base.stop_ids
    favour(base.lm, eot)
    policy = policy_over(base, max_new_tokens=6, min_new_tokens=3)
    rollout = policy.sample(base.encode(["The dog runs"] * 4), torch.Generator().manual_seed(0))
    assert rollout.response_mask.sum(-1).tolist() == [4] * 4  # 3 tokens, then <eot> as soon as it is allowed
    assert not torch.isin(rollout.response_ids[:, :3], torch.tensor([eos, eot])).any()
    assert torch.allclose(policy(rollout).logprobs, rollout.logprobs, atol=1e-5)


def test_a_pad_token_that_is_also_a_stop_token_can_be_sampled(chat_llama):
    """Qwen2.5 chat models pad with <|endoftext|>, one of their stop ids: it must stay samplable (and end the response)."""
    base = LocalBase(chat_llama, dtype="float32", stop_tokens=["<eot>", "<pad>"])
    pad = base.tokenizer.pad_token_id
    favour(base.lm, pad)
    policy = policy_over(base, max_new_tokens=5)
    rollout = policy.sample(base.encode(["The dog runs"]), torch.Generator().manual_seed(0))
    assert rollout.response_ids[0, 1] == pad and rollout.response_ids.shape[1] == 2 and policy.ended(rollout.response_ids, rollout.response_mask).all()
    plain = policy_over(LocalBase(chat_llama, dtype="float32"), max_new_tokens=5)
    assert plain.never_sampled[pad] and not policy.never_sampled[pad]  # padding that is not a stop token is never sampled


# ---- 4. a support that the bans would empty ----

def test_a_support_of_stop_tokens_only_lets_the_stop_ban_give_way(tiny_llama):
    """top_k=1 on a model whose best token is EOS, with min_new_tokens = max_new_tokens: every token is banned at step 0."""
    base = LocalBase(tiny_llama, dtype="float32", top_k=1)
    favour(base.lm, base.tokenizer.eos_token_id)
    policy = policy_over(base, max_new_tokens=4, min_new_tokens=4)
    rollout = policy.sample(base.encode(["The dog runs", "A child"]), torch.Generator().manual_seed(0))
    assert (rollout.response_ids[:, 0] == base.tokenizer.eos_token_id).all()  # the ban on stopping early gave way
    assert torch.isfinite(rollout.logprobs).all() and torch.isfinite(rollout.kl).all()
    evaluated = policy(rollout, with_kl=True)
    assert torch.isfinite(evaluated.logprobs).all() and torch.allclose(evaluated.logprobs, rollout.logprobs)


def test_a_support_of_padding_only_samples_padding_rather_than_nan(tiny_llama):
    base = LocalBase(tiny_llama, dtype="float32", top_k=1)
    pad = base.tokenizer.pad_token_id
    favour(base.lm, pad)
    policy = policy_over(base, max_new_tokens=3)
    prompts = base.encode(["The dog"])
    logprobs = policy.distribution(base(prompts.ids, prompts.mask, position_ids(prompts.mask))[0], None, 0)
    assert logprobs[0, pad] == 0.0 and torch.isinf(logprobs[0]).sum() == base.vocab_size - 1


def test_bans_are_unchanged_where_the_support_has_room(policy_factory):
    """The give-way rule touches only rows the bans would empty: the full-vocabulary policy is what it was."""
    policy = policy_factory(max_new_tokens=4, min_new_tokens=2)
    base_lp = torch.randn(3, policy.base.vocab_size).log_softmax(-1)
    logprobs = policy.distribution(base_lp, None, torch.tensor([0, 1, 2]))
    eos, pad = policy.base.tokenizer.eos_token_id, policy.pad_id
    assert torch.isinf(logprobs[:2, eos]).all() and torch.isfinite(logprobs[2, eos]) and torch.isinf(logprobs[:, pad]).all()


# ---- 2. context windows ----

@pytest.fixture(scope="module")
def short_gpt2(tmp_path_factory) -> str:
    """GPT-2 with a 32-token context window (learned positions: reading past it is an index error)."""
    path = tmp_path_factory.mktemp("short_gpt2")
    tokenizer = train_tokenizer(300, ["<eos>", "<pad>"])
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=32,
                               eos_token_id=tokenizer.eos_token_id)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


LONG_PROMPT = "The dog runs to the tree and the cat sleeps on the warm roof. A child reads a book by the river and"


def test_a_prompt_too_long_for_the_window_is_refused_by_default(short_gpt2):
    base = LocalBase(short_gpt2, dtype="float32")
    assert base.max_positions == 32 and len(base.tokenizer(LONG_PROMPT)["input_ids"]) > 20
    policy = policy_over(base, max_new_tokens=12)
    assert policy.context_window() == 20
    with pytest.raises(ValueError, match=r"1 prompt of this batch is longer than the 20 tokens that fit in the context window \(base 32, "
                                         r"adapter 32\) before max_new_tokens=12: #1: \d+ tokens \('The dog runs.*long_prompts=cut_left"):
        policy.sample(policy.encode(["A child", LONG_PROMPT]))


def test_a_prompt_too_long_for_the_window_is_cut_from_the_left_when_asked(short_gpt2):
    base = LocalBase(short_gpt2, dtype="float32")
    policy = policy_over(base, max_new_tokens=12, min_new_tokens=12, long_prompts="cut_left")
    with pytest.warns(UserWarning, match=r"longer than the 20 tokens .* \(base 32, adapter 32\) .* cut from the left .* 1 of this batch of 2"):
        prompts = policy.encode(["A child", LONG_PROMPT])
    full = base.tokenizer(LONG_PROMPT)["input_ids"]
    assert prompts.ids.shape[1] == 20 and prompts.ids[1].tolist() == full[-20:] and (policy.prompts_cut, policy.last_cut) == (1, 1)
    rollout = policy.sample(prompts, torch.Generator().manual_seed(0))  # 20 + 12 positions: the whole window, no index error
    assert rollout.response_mask.sum(-1).tolist() == [12, 12]
    assert torch.isfinite(policy(rollout).logprobs).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: later cuts are counted, not warned about
        policy.encode([LONG_PROMPT] * 3)
    assert (policy.prompts_cut, policy.last_cut) == (4, 3)


def test_a_cut_keeps_bos_and_the_chat_templates_turns(chat_llama):
    """The cut drops the first tokens of the prompt's text; BOS and the chat turns around it are rendered again."""
    base = LocalBase(chat_llama, dtype="float32", chat_template=True, system_prompt="Be brief.")
    policy = policy_over(base, max_new_tokens=200, long_prompts="cut_left")
    room = policy.context_window()
    assert room == 56
    with pytest.warns(UserWarning, match="cut from the left"):
        prompts = policy.encode([LONG_PROMPT * 2])
    text = base.tokenizer.decode(prompts.ids[0][prompts.mask[0].bool()])
    assert prompts.mask.sum() <= room
    assert text.startswith("<|start|>system\nBe brief.<eot><|start|>user\n") and text.endswith("river and<eot><|start|>assistant\n")
    with pytest.raises(ValueError, match=r"chat template and special tokens around a prompt alone take more than the 5 tokens"):
        policy_over(base, max_new_tokens=251, long_prompts="cut_left").encode([LONG_PROMPT])


def test_max_new_tokens_that_fill_the_window_are_refused_at_construction(short_gpt2):
    with pytest.raises(ValueError, match=r"max_new_tokens=32 leaves no room for a prompt in a context window of 32 tokens"):
        policy_over(LocalBase(short_gpt2, dtype="float32"), max_new_tokens=32)


def test_the_adapters_window_counts_and_its_prefix_control_code_takes_a_position(tiny_llama, short_gpt2):
    base = LocalBase(tiny_llama, dtype="float32")
    adapter = Adapter.build(AdapterConfig(num_layers=1, head="zeros"), base)
    adapter.max_positions = 24  # as an adapter checkpoint with a smaller window than the base's 256
    policy = TailoredPolicy(base, adapter, sampling=Sampling(max_new_tokens=8))
    assert policy.context_window() == 16
    adapter.add_controls(3, "prefix")
    assert policy.context_window() == 15


class Constant(Reward):
    def __call__(self, prompts, responses, meta):
        return {"reward": torch.zeros(len(responses))}


def test_fit_refuses_long_prompts_before_any_work(short_gpt2, tmp_path):
    data = ConceptsDataModule(batch_size=2, train_size=8, val_size=2)
    data.setup("fit")
    data.splits["train"][5]["prompt"] = LONG_PROMPT * 2
    data.setup = lambda stage=None: None  # keep the edited split
    module = IPAModule(LocalBase(short_gpt2, dtype="float32"), Constant(), adapter=AdapterConfig(num_layers=1),
                       sampling=Sampling(max_new_tokens=2))
    trainer = Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"1 prompt of the 'train' split \(train_size=8\) is longer than the 30 tokens .* #5: \d+ tokens"):
        trainer.fit(module, datamodule=data)
    assert module.policy.base.forward_count == 0  # refused before any rollout


# ---- evaluation LMs: perplexity of texts longer than the window ----

def test_sliding_windows_cover_each_scored_token_once_within_the_window():
    tokens = list(range(100))
    pieces = sliding_windows(tokens, 1, 32)
    assert all(len(piece) <= 32 and start >= 1 for piece, start in pieces)
    scored = [t for piece, start in pieces for t in piece[start:]]
    assert scored == tokens[1:]
    assert min(start for piece, start in pieces[1:]) == 16  # every later token reads at least half a window of context
    assert sliding_windows(tokens, 90, 32) == [(tokens[64:96], 26), (tokens[80:100], 16)]  # windows before the start are skipped
    assert sliding_windows(tokens[:20], 3, 32) == [(tokens[:20], 3)]


def test_perplexity_of_texts_longer_than_the_window_is_the_transformers_sliding_window_value(short_gpt2):
    """Pinned to the loop of transformers' guide "Perplexity of fixed-length models" (max_length 32, stride 16),
    with each window's NLL summed over the tokens it scores."""
    perplexity = Perplexity(short_gpt2, dtype="float32", variant="separate")
    text = (LONG_PROMPT + " ") * 2
    ids = perplexity.tokenizer(text)["input_ids"]
    assert len(ids) > 64
    lm = AutoModelForCausalLM.from_pretrained(short_gpt2)
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(ids), 16):  # the guide's loop
        end = min(begin + 32, len(ids))
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, : -(end - previous_end)] = -100
        with torch.no_grad():
            loss = lm(window, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll, count = nll + loss.item() * scored, count + scored
        previous_end = end
        if end == len(ids):
            break
    ours = perplexity(["x"], [text])  # separate: BOS = none here, so the prompt "x" then the text
    assert perplexity._nll_sums([(ids, 1)])[0] == pytest.approx(nll, rel=1e-5)
    assert count == len(ids) - 1 and math.isfinite(ours.item())
    dexperts = Perplexity(short_gpt2, dtype="float32")
    assert torch.isfinite(dexperts([LONG_PROMPT], [" " + LONG_PROMPT])).all()  # joined text past the window: no index error


# ---- reward models: responses longer than the classifier reads ----

@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_a_classifier_reward_reads_the_start_of_a_response_longer_than_its_window(family, tmp_path):
    """A tokenizer saved without ``model_max_length`` and a classifier with 34 positions (RoBERTa's ids start after the
    padding index, so it reads 33 tokens; BERT 34): a long response is truncated to them, never an index error."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer, RobertaConfig, RobertaForSequenceClassification

    from lightning_ipa.rewards import ClassifierReward
    from tests.conftest import save_tiny_bert

    save_tiny_bert(tmp_path / "bert")
    tokenizer = BertTokenizer(str(tmp_path / "bert" / "vocab.txt"))  # no model_max_length
    assert tokenizer.model_max_length > 1e6
    config = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=34, num_labels=2)
    torch.manual_seed(0)
    model = (RobertaForSequenceClassification(RobertaConfig(pad_token_id=tokenizer.pad_token_id, **config)) if family == "roberta"
             else BertForSequenceClassification(BertConfig(**config)))
    model.save_pretrained(tmp_path / family)
    tokenizer.save_pretrained(tmp_path / family)
    reward = ClassifierReward(str(tmp_path / family), label=1)
    window = 33 if family == "roberta" else 34
    long = " ".join(["the dog runs to the tree"] * 20)
    assert len(tokenizer(long)["input_ids"]) > 100
    first = tokenizer.convert_tokens_to_string(tokenizer.tokenize(long)[: window - 2])  # [CLS] … [SEP] around them
    scores = reward(["p", "p"], [long, first], [{}, {}])["reward"]
    assert scores[0] == pytest.approx(scores[1].item(), abs=1e-6)


def test_distillation_prompts_fit_the_students_window_too(tiny_llama, tmp_path):
    """The student reads prompt + teacher response: a student with a smaller window than the teacher's bounds the prompts."""
    from transformers import AutoTokenizer

    from lightning_ipa.distill import DistillModule

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                 max_position_embeddings=32)).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    distill = DistillModule(LocalBase(tiny_llama, dtype="float32"), str(tmp_path / "student"), str(tmp_path / "out"), Sampling(max_new_tokens=8))
    assert distill.teacher.context_window() == 24  # the student's 32, not the teacher's 256
    data = ConceptsDataModule(batch_size=2, train_size=8, val_size=2)
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"prompts? of the 'train' split \(train_size=8\) (is|are) longer than the 24 tokens that fit in the context window \(base 256, student 32\)"):
        trainer.fit(distill, datamodule=data)
    assert distill.teacher.base.forward_count == 0


# ---- what a user's settings and tokenizers bring (found by trying, issue 18) ----

def test_a_pad_borrowed_from_eos_stays_a_real_token_when_stop_tokens_leave_eos_out(tmp_path):
    """Pythia has no pad token: the library pads with EOS. With stop_tokens=["."] EOS is an ordinary token again, as in
    HF generate(eos_token_id=[.]): the policy must not ban it because it pads."""
    from tests.model_families import save_tiny_gpt_neox

    path = save_tiny_gpt_neox(tmp_path / "neox", best_token="<|endoftext|>")
    base = LocalBase(str(path), dtype="float32", stop_tokens=["."])
    eos = base.tokenizer.eos_token_id
    assert base.tokenizer.pad_token_id == eos and base.stop_ids == [base.tokenizer.convert_tokens_to_ids(".")]
    policy = policy_over(base, alpha=0.0, max_new_tokens=4)
    prompts = base.encode(["The dog runs"])
    logprobs = policy.distribution(base(prompts.ids, prompts.mask, position_ids(prompts.mask))[0], None, 1)
    assert not policy.never_sampled[eos] and logprobs[0, eos].exp() > 0.99  # the model's best token keeps its probability
    rollout = policy.sample(prompts, torch.Generator().manual_seed(0))
    assert (rollout.response_ids == eos).all() and rollout.response_mask.all()  # EOS sampled as a token; no stop


def test_a_tokenizer_with_neither_eos_nor_pad_pads_with_its_stop_token(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.eos_token, tokenizer.pad_token = None, None
    tokenizer.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model.generation_config.eos_token_id = model.config.eos_token_id = model.generation_config.pad_token_id = model.config.pad_token_id = None
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no EOS token and the generation config no eos_token_id: set stop_tokens"):
        LocalBase(str(tmp_path), dtype="float32")
    base = LocalBase(str(tmp_path), dtype="float32", stop_tokens=["."])
    assert base.tokenizer.pad_token == "."
    rollout = policy_over(base, max_new_tokens=4).sample(base.encode(["The dog", "A child reads"]), torch.Generator().manual_seed(0))
    assert rollout.response_ids.shape[0] == 2


@pytest.mark.parametrize("template,found", [
    ("{% for m in messages %}{{ m['content'] }}<eot>{% endfor %}", True),
    ("{% for m in messages %}{{ m['content'] }} <eot>{% endfor %}", True),  # a space before the end of turn
    ("{% for m in messages %}{{ m['content'] }}\n<eot>\n{% endfor %}", True),  # a newline before it
    ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('system first') }}{% endif %}"
     "{% for m in messages %}{{ m['content'] }}<eot>{% endfor %}", True),  # needs the system turn it is given
    ("{% for m in messages %}{{ m['content'] }}\n\n{% endfor %}", False),  # turns closed by plain text: none, and a warning
])
def test_the_end_of_turn_is_found_in_the_shapes_chat_templates_take(chat_llama, tmp_path, template, found):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    tokenizer.chat_template = template
    eos, eot = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<eot>")
    generation = GenerationConfig(eos_token_id=eos)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = stop_ids(tokenizer, generation, True, None, len(tokenizer), system_prompt="Be brief.")
    assert ids == (sorted([eos, eot]) if found else [eos])
    assert any("found no special token that ends the assistant's turn" in str(w.message) for w in caught) != found


def test_stop_token_settings_are_read_as_users_mean_them(chat_llama, tiny_llama):
    eot = LocalBase(chat_llama, dtype="float32").tokenizer.convert_tokens_to_ids("<eot>")
    assert LocalBase(chat_llama, dtype="float32", stop_tokens="<eot>").stop_ids == [eot]  # one token, not its characters
    with pytest.raises(ValueError, match=r"\['\\n'\] not in the tokenizer's vocabulary .*'\\n' encodes as \['Ċ'\] \(ids \[\d+\]\).*'Ċ'"):
        LocalBase(chat_llama, dtype="float32", stop_tokens=["\n"])
    with pytest.raises(ValueError, match=r"chat_template=true, but the tokenizer .* has no chat template.*chat_template=false"):
        LocalBase(tiny_llama, dtype="float32", chat_template=True)
