"""Tiny models and tokenizers built in-process: the tests never download anything."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BertConfig, BertForSequenceClassification, BertTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from lightning_ipa import Adapter, AdapterConfig, LocalBase, Sampling, TailoredPolicy
from tasks.concepts import NOUNS, VERBS

CORPUS = [
    "Write one sentence that uses all of these words: " + ", ".join(NOUNS[i : i + 3] + VERBS[i % len(VERBS) : i % len(VERBS) + 1]) + "."
    for i in range(0, len(NOUNS), 3)
] + ["The dog runs to the tree and the cat sleeps on the warm roof. A child reads a book by the river."] * 4


def train_tokenizer(vocab_size: int, special: list[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a small corpus, with EOS and a distinct pad token."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<pad>")


def save_tiny_llama(path: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    tokenizer = train_tokenizer(vocab_size, ["<eos>", "<pad>"])
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a peaked, far-from-uniform distribution, like a trained LM's
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert(path: Path, labels: Sequence[str] = ("negative", "positive"), seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT sequence classifier (hidden 32) with a word-level tokenizer, saved as a HF folder."""
    path.mkdir(parents=True, exist_ok=True)
    words = sorted({w for text in CORPUS for w in re.findall(r"\w+", text.lower())} | set("you are a nice kind stupid idiot safe".split()))
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(path / "vocab.txt"), model_max_length=64).save_pretrained(path)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=5 + len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(path)
    return model


def save_tiny_sentence_embedder(path: Path) -> Path:
    """A sentence-transformers model: the tiny BERT's encoder with mean pooling."""
    from sentence_transformers import SentenceTransformer, models as st_models

    save_tiny_bert(path / "bert")
    SentenceTransformer(modules=[st_models.Transformer(str(path / "bert")), st_models.Pooling(32, "mean")]).save(str(path / "model"))
    return path / "model"


def tiny_gpt2_saver(tokenizer: PreTrainedTokenizerFast, layers: int, n_positions: int = 128) -> Callable[[Path], None]:
    """Saves a tiny GPT-2 (hidden 32) with ``layers`` layers and ``tokenizer`` into a folder (e.g. for ``save_in_hub_cache``)."""

    def save(path: Path) -> None:
        config = GPT2Config(vocab_size=len(tokenizer), n_layer=layers, n_embd=32, n_head=2, n_positions=n_positions,
                            bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
        GPT2LMHeadModel(config).save_pretrained(path)
        tokenizer.save_pretrained(path)

    return save


def save_in_hub_cache(hub: Path, name: str, save: Callable[[Path], object]) -> None:
    """Put a model where ``from_pretrained(name)`` finds it offline (``HF_HUB_OFFLINE=1``): the hub cache's layout."""
    revision = "0" * 40
    repo = hub / f"models--{name.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    save(repo / "snapshots" / revision)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory) -> str:
    """A tiny BERT classifier with labels ('negative', 'positive')."""
    path = tmp_path_factory.mktemp("tiny_classifier")
    save_tiny_bert(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory) -> str:
    """A tiny sentence-transformers model (BERT + mean pooling)."""
    return str(save_tiny_sentence_embedder(tmp_path_factory.mktemp("tiny_embedder")))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 3-layer Llama (hidden 32) with its own BPE tokenizer, saved as a HF folder."""
    return str(save_tiny_llama(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_gpt2_other_vocab(tmp_path_factory) -> str:
    """A tiny GPT-2 whose tokenizer differs from ``tiny_llama``'s."""
    path = tmp_path_factory.mktemp("tiny_gpt2")
    tokenizer = train_tokenizer(300, ["<eos>", "<pad>", "<extra>"])
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def policy_factory(tiny_llama):
    """Builds a TailoredPolicy over the tiny Llama (base: all layers; adapter: the first k)."""

    def build(alpha: float = 1.0, head: str = "zeros", num_layers: int = 2, **sampling) -> TailoredPolicy:
        base = LocalBase(tiny_llama, dtype="float32")
        adapter = Adapter.build(AdapterConfig(num_layers=num_layers, head=head), base)
        return TailoredPolicy(base, adapter, alpha, Sampling(**sampling))

    return build
