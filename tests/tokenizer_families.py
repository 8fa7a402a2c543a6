"""Tokenizers of the families real LMs use, trained in-process (deterministic, < 1 s each, no downloads).

- ``byte_level_bpe()``: GPT-2 style byte-level BPE (ByteLevel pre-tokenizer and decoder).
- ``sentencepiece_bpe(byte_fallback=True)``: Llama-2/Mistral style, as transformers' ``LlamaConverter`` builds it:
  BPE with ``<0xNN>`` byte-fallback pieces, Metaspace pre-tokenizer, decoder Replace("▁", " ") + ByteFallback + Fuse + Strip.
- ``sentencepiece_bpe(byte_fallback=False)``: SentencePiece without byte fallback (unknown characters → ``<unk>``), with the
  Metaspace decoder ``SpmConverter`` gives T5/ALBERT-style tokenizers.
- ``tiktoken_style()``: Llama-3/Qwen2 style, as ``TikTokenConverter`` builds it: byte-level BPE over the tiktoken split regex,
  ``ignore_merges``, and added special tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``).

The corpus has Latin-1 letters (é, ü, ñ: SentencePiece pieces whose characters look like byte-level symbols) and CJK
characters (several bytes each); emoji are left out, so SentencePiece encodes them through byte fallback or ``<unk>``.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "The dog runs to the tree, and the cat sleeps on the warm roof of the house.",
    "A child reads a book by the river; the end of the story is near.",
    "Write one sentence that uses all of these words: apple, table, run, jump.",
    "Numbers like 12, 345 and 6789 appear in lists of prices: $5.99, €12.50.",
    "Le café est très bon, mais le thé à côté est déjà froid. Où est l'élève ?",
    "Über die Brücke gehen Müller und Schäfer; die Tür ist grün und schön.",
    "El niño y la niña comen piña en la montaña; mañana es el año nuevo.",
    "中文的句子很短。我们喜欢学习中文。日本語も少し。",
    "def main():\n    print('hello, world')\n    return 0\n",
]
SPECIAL_IM = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TIKTOKEN_PATTERN = (  # TikTokenConverter's default, Llama-3's split regex
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def corpus(repeats: int = 3) -> list[str]:
    """The training texts (repeated so that merges have counts to rank)."""
    return CORPUS * repeats


def train_byte_level(special_tokens: list[str], vocab_size: int) -> Tokenizer:
    """A GPT-2 style byte-level BPE model trained on ``corpus()``, its special tokens first (ids 0, 1, ...)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    return tokenizer


def byte_level_bpe(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE with ``<|endoftext|>`` (EOS) and ``<pad>``."""
    tokenizer = train_byte_level(["<|endoftext|>", "<pad>"], vocab_size)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<pad>")


def sentencepiece_bpe(byte_fallback: bool, vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """SentencePiece BPE: ``<unk>``, ``<s>`` (BOS, prepended), ``</s>`` (EOS), ``<pad>``, [``<0x00>``...``<0xFF>``], then the pieces.

    ``vocab_size`` counts the trained pieces (the specials and byte pieces come on top).
    """
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False))
    model = json.loads(trained.to_str())["model"]
    pieces = [piece for piece, _ in sorted(model["vocab"].items(), key=lambda item: item[1]) if piece not in specials]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)] if byte_fallback else []
    vocab = {piece: i for i, piece in enumerate(specials + byte_pieces + pieces)}
    merges = [tuple(merge) for merge in model["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=byte_fallback))
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in specials])
    if byte_fallback:  # LlamaConverter (non-legacy)
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        tokenizer.decoder = decoders.Sequence(steps)
    else:  # SpmConverter
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def tiktoken_style(vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Llama-3/Qwen2 style byte-level BPE over the tiktoken regex; EOS ``<|im_end|>``, pad ``<|endoftext|>`` (added tokens)."""
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(TIKTOKEN_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in SPECIAL_IM])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


TOKENIZER_FAMILIES = {  # name → builder, for tests parametrized over the families
    "byte_level_bpe": byte_level_bpe,
    "sentencepiece_byte_fallback": lambda: sentencepiece_bpe(byte_fallback=True),
    "sentencepiece_no_byte_fallback": lambda: sentencepiece_bpe(byte_fallback=False),
    "tiktoken_style": tiktoken_style,
}
