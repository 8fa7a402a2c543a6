"""Tiny causal LMs of four families, each with its own tokenizer, built in-process and saved as HF folders.

- ``save_tiny_llama``: Llama, SentencePiece BPE with byte fallback (``<s>``, ``</s>``); a Llama-3-Instruct-style chat
  template whose turns end with ``<|eot_id|>``, listed with ``</s>`` in ``generation_config.eos_token_id``.
- ``save_tiny_gpt2``: GPT-2, byte-level BPE (EOS ``<|endoftext|>``, pad ``<pad>``), learned positions: indexing past
  ``n_positions`` is an IndexError.
- ``save_tiny_qwen2``: Qwen2, tiktoken-style BPE as Qwen2.5-Instruct ships it: EOS ``<|im_end|>``, pad ``<|endoftext|>``,
  ``generation_config.eos_token_id = [<|im_end|>, <|endoftext|>]``, a ChatML template (``<|im_start|>``/``<|im_end|>``).
- ``save_tiny_gpt_neox``: GPT-NeoX as Pythia ships it: byte-level BPE, ``<|endoftext|>`` is BOS and EOS, no pad token.

Every model has ``CONTEXT`` positions, hidden size 32 and 2-3 layers; its LM head is untied and drawn from N(0, 0.5²)
(``peak``), so that its next-token distribution is peaked like a trained LM's rather than uniform. ``best_token`` builds a model whose most
likely next token is that token after any input (``make_best``), e.g. one that always wants to end its turn.
Each builder is deterministic (seeded) and takes well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from transformers import (
    GenerationConfig, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM,
    PreTrainedModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM,
)

from tests.tokenizer_families import byte_level_bpe, sentencepiece_bpe, tiktoken_style, train_byte_level

CONTEXT = 64  # every tiny model's context window, in positions
ENDOFTEXT = "<|endoftext|>"
HEAD_STD = 0.5  # logits' spread ≈ 0.5·√32 ≈ 2.8 nats: peaked, yet samples vary
Token = Union[int, str]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def token_id(tokenizer: PreTrainedTokenizerFast, token: Token) -> int:
    """The id of ``token`` (an id, or a token string of the vocabulary)."""
    if isinstance(token, int):
        return token
    vocab = tokenizer.get_vocab()
    if token not in vocab:
        raise KeyError(f"{token!r} is not in the tokenizer's vocabulary")
    return vocab[token]


def peak(model: PreTrainedModel, std: float = HEAD_STD) -> None:
    """An LM head drawn from N(0, std²): a peaked, far-from-uniform next-token distribution, like a trained LM's.

    The head is untied from the input embeddings: a tied head as large as this makes every model repeat its last token.
    """
    assert model.get_output_embeddings().weight is not model.get_input_embeddings().weight, "untie the head first"
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0, std)


def make_best(model: PreTrainedModel, token: int, margin: float = 10.0, offset: float = 20.0) -> None:
    """Make ``token`` the most likely next token after any input, by a wide margin (in place).

    Every input embedding gets ``offset`` added to its first coordinate: a constant direction that dominates the
    residual stream, so that after the final norm (RMSNorm or LayerNorm) the first coordinate of every hidden state
    is large and positive (≈ √hidden). The LM head's row of ``token`` then gets ``margin`` more in that coordinate.
    With a tied head the offset shifts every logit alike, which changes no probability.
    """
    with torch.no_grad():
        model.get_input_embeddings().weight[:, 0] += offset
        model.get_output_embeddings().weight[token, 0] += margin
    check_best(model, token)


def check_best(model: PreTrainedModel, token: int) -> None:
    """Raise AssertionError unless ``token`` is the model's argmax after every prefix of a few random inputs."""
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (4, 12), generator=torch.Generator().manual_seed(0))
    training = model.training
    model.eval()  # no dropout
    with torch.no_grad():
        best = model(input_ids=ids).logits.argmax(-1)
    model.train(training)
    assert (best == token).all(), f"make_best: token {token} is not the best everywhere: {best.tolist()}"


@dataclass(frozen=True)
class Family:
    """A model family: how to save a tiny one, and what the tests need to know of it."""

    name: str
    save: Callable[..., Path]  # save(path, seed=0, best_token=None, context=CONTEXT) -> path
    chat: bool  # it has a chat template (prompts are user turns of it)
    eos: str  # the tokenizer's EOS token
    end_of_turn: str  # the token that ends an assistant's answer (the chat template's, else EOS)
    stop_tokens: tuple[str, ...]  # the tokens HF ``generate`` stops on (EOS and the generation config's eos_token_id)


def _save(path: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, generation: GenerationConfig,
          best_token: Optional[Token]) -> Path:
    peak(model)
    if best_token is not None:
        make_best(model, token_id(tokenizer, best_token))
    model.generation_config = generation
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece BPE with byte fallback (``<s>`` prepended, EOS ``</s>``, ``<pad>``) and a Llama-3 style chat template."""
    tokenizer = sentencepiece_bpe(byte_fallback=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def save_tiny_llama(path: Path, seed: int = 0, best_token: Optional[Token] = None, context: int = CONTEXT) -> Path:
    """A 3-layer Llama (hidden 32, 4 heads, 2 KV heads, tied head); generation stops on ``</s>`` and ``<|eot_id|>``."""
    tokenizer = llama_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    eot = token_id(tokenizer, "<|eot_id|>")
    generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, eot])
    return _save(path, LlamaForCausalLM(config), tokenizer, generation, best_token)


def save_tiny_gpt2(path: Path, seed: int = 0, best_token: Optional[Token] = None, context: int = CONTEXT) -> Path:
    """A 2-layer GPT-2 (hidden 32, 2 heads, learned positions: ``n_positions`` = ``context``) with byte-level BPE."""
    tokenizer = byte_level_bpe()
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=context, bos_token_id=eos, eos_token_id=eos,
                        tie_word_embeddings=False)
    return _save(path, GPT2LMHeadModel(config), tokenizer, GenerationConfig(bos_token_id=eos, eos_token_id=eos), best_token)


def qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """Tiktoken-style BPE as Qwen2.5-Instruct's: EOS ``<|im_end|>``, pad ``<|endoftext|>``, no BOS, a ChatML template."""
    tokenizer = tiktoken_style()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>" and tokenizer.bos_token is None
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def save_tiny_qwen2(path: Path, seed: int = 0, best_token: Optional[Token] = None, context: int = CONTEXT) -> Path:
    """A 2-layer Qwen2 (hidden 32, 4 heads, 2 KV heads, tied head); generation stops on ``<|im_end|>`` and ``<|endoftext|>``."""
    tokenizer = qwen2_tokenizer()
    torch.manual_seed(seed)
    im_end, endoftext = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=context, bos_token_id=endoftext, eos_token_id=im_end,
        tie_word_embeddings=False,
    )
    generation = GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext)
    return _save(path, Qwen2ForCausalLM(config), tokenizer, generation, best_token)


def pythia_tokenizer(vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """Byte-level BPE as Pythia's: ``<|endoftext|>`` (id 0) is BOS, EOS and UNK; ``<|padding|>`` exists but no pad token is set."""
    tokenizer = train_byte_level(["<|endoftext|>", "<|padding|>"], vocab_size)
    endoftext = "<|endoftext|>"
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=endoftext, eos_token=endoftext, unk_token=endoftext)
    assert wrapped.pad_token is None
    return wrapped


def save_tiny_gpt_neox(path: Path, seed: int = 0, best_token: Optional[Token] = None, context: int = CONTEXT) -> Path:
    """A 2-layer GPT-NeoX (hidden 32, 4 heads, parallel residual, rotary on a quarter of each head, untied head)."""
    tokenizer = pythia_tokenizer()
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=context, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        bos_token_id=eos, eos_token_id=eos, tie_word_embeddings=False, use_parallel_residual=True,
    )
    return _save(path, GPTNeoXForCausalLM(config), tokenizer, GenerationConfig(bos_token_id=eos, eos_token_id=eos), best_token)


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family("llama", save_tiny_llama, chat=True, eos="</s>", end_of_turn="<|eot_id|>", stop_tokens=("</s>", "<|eot_id|>")),
        Family("gpt2", save_tiny_gpt2, chat=False, eos=ENDOFTEXT, end_of_turn=ENDOFTEXT, stop_tokens=(ENDOFTEXT,)),
        Family("qwen2", save_tiny_qwen2, chat=True, eos="<|im_end|>", end_of_turn="<|im_end|>", stop_tokens=("<|im_end|>", ENDOFTEXT)),
        Family("gpt_neox", save_tiny_gpt_neox, chat=False, eos=ENDOFTEXT, end_of_turn=ENDOFTEXT, stop_tokens=(ENDOFTEXT,)),
    )
}
