"""``python -m lightning_ipa export``: a trained adapter as a folder plain transformers reads.

The folder holds the adapter as a causal LM of its family (``config.json``, ``model.safetensors``: ``from_pretrained``
reads it), the base's tokenizer, a ``generation_config.json`` with the decoding settings of the run, ``ipa_adapter.json``
(α, the policy's bans and ``min_new_tokens``, the base's top-k support, the control code's mode) and a model card (``README.md``: base, α, reward, algorithm, the
run's test metrics). ``AdapterLogitsProcessor.from_pretrained(folder)`` applies it inside the base's ``generate``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import yaml
from lightning.pytorch.cli import instantiate_class
from torch import nn
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from .adapters import Adapter, AdapterConfig, ProjectedHead, ScaledHead
from .algorithms import RLOO
from .bases import LOGIT_SCALINGS, LocalBase, read_generation_config, resolve_pretrained
from .io import write_dir_atomic
from .module import fit_problems, trained_keys
from .policy import Sampling, TailoredPolicy
from .processor import ADAPTER_FILE, CONTROL_FILE
from .remote import RemoteBase

ADAPTER_PREFIX = "policy.adapter."


def export_adapter(ckpt_path: str, output: str, results: Optional[str] = None, overwrite: bool = False) -> Path:
    """Write the adapter of a ``fit`` checkpoint as a folder that transformers' ``from_pretrained`` reads.

    The base, adapter, α, algorithm, reward and decoding settings come from the checkpoint's saved configuration (what
    ``fit`` ran with); the base is loaded for its tokenizer and vocabulary (and, for an adapter built from its layers,
    its weights). A 'projection' head (a trained H×H projection before the frozen LM head) is written as the one V×H
    matrix they make (the product computed in float64); 'zeros' and 'pretrained' heads are written as they are. A
    control code (Quark) is kept apart (``ipa_control.safetensors``): ``AdapterLogitsProcessor`` reads it as the
    adapter does (a prefix position, or added to every input embedding).

    Args:
        ckpt_path: A checkpoint written by ``fit`` (a run's ``checkpoints/last.ckpt``).
        output: The folder to write (written whole or not at all).
        results: The ``results.json`` of a ``test`` of this checkpoint, for the model card (None: the newest one among
            the runs beside the checkpoint's run whose ``checkpoint`` is this file, if any).
        overwrite: Replace a folder already at ``output`` (otherwise refused).

    Returns:
        The folder written.

    Raises:
        SystemExit: no such checkpoint, one without the configuration ``fit`` saves, one whose tensors do not fit the
            adapter it configures, or an ``output`` that exists (without ``overwrite``).
    """
    ckpt, target = Path(ckpt_path), Path(output).resolve()
    if not ckpt.is_file():
        raise SystemExit(f"--ckpt_path {ckpt_path}: no such file; pass a checkpoint written by fit (a run's checkpoints/last.ckpt)")
    if target.is_file():
        raise SystemExit(f"--output {output} is a file: give a folder to write the adapter into")
    refuse_holding(target, output, [("the checkpoint", ckpt.resolve()), ("the working directory", Path.cwd())])
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise SystemExit(f"--output {output} exists: choose another folder, or pass --overwrite true to replace it")
    if results and not Path(results).is_file():
        raise SystemExit(f"--results {results}: no such file; pass the results.json a `test` of this checkpoint wrote, or leave it out")
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=False)
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams.get("base"), dict) or "class_path" not in hparams["base"]:
        raise SystemExit(f"{ckpt_path} holds no base configuration (a checkpoint of `python -m lightning_ipa fit` does): "
                         "export needs the base it was trained with")
    base = instantiate_class((), hparams["base"])
    adapter_config = AdapterConfig(**hparams.get("adapter") or {})
    local = [("the base's weights", base.path), ("the adapter's checkpoint", adapter_config.name_or_path and resolve_pretrained(adapter_config.name_or_path))]
    refuse_holding(target, output, [(what, Path(path).resolve()) for what, path in local if path and Path(path).exists()])
    adapter = Adapter.build(adapter_config, base)
    algorithm = instantiate_class((), hparams["algorithm"]) if hparams.get("algorithm") else RLOO()
    algorithm.setup(adapter)  # Quark's control codes
    load_adapter_state(adapter, checkpoint["state_dict"], ckpt_path)
    policy = TailoredPolicy(base, adapter, hparams.get("alpha", 1.0), Sampling(**hparams.get("sampling") or {}))
    model = adapter_model(adapter)
    generation = generation_config(policy)
    results_path = Path(results) if results else find_results(ckpt)
    tested = json.loads(results_path.read_text()) if results_path else None
    if tested is not None and not same_file(tested.get("checkpoint"), ckpt, results_path):
        raise SystemExit(f"--results {results}: the results of a test of {tested.get('checkpoint')}, not of {ckpt_path}")
    card = model_card(hparams, checkpoint, ckpt, base, tested, results_path)
    meta = {"format": 1, "alpha": policy.alpha, "vocab_size": base.vocab_size, "never_sampled": policy.never_sampled.nonzero().flatten().tolist(),
            "stop_ids": list(base.stop_ids), "min_new_tokens": policy.sampling.min_new_tokens, "base_top_k": base.support_size,
            "control": adapter.control_mode if adapter.controls is not None else None,
            "base": hparams["base"], "adapter": hparams.get("adapter"), "checkpoint": str(ckpt.resolve())}

    def write_extras(folder: Path) -> None:
        base.tokenizer.save_pretrained(folder)
        generation.save_pretrained(folder)
        (folder / ADAPTER_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # the folder is renamed into place whole
        (folder / "README.md").write_text(card)
        if adapter.controls is not None:
            from safetensors.torch import save_file

            save_file({"control": adapter.controls.weight[0].detach().contiguous()}, folder / CONTROL_FILE)

    write_dir_atomic(target, model.save_pretrained, write_extras, replace=True)
    print(f"Wrote the adapter to {target}: AdapterLogitsProcessor.from_pretrained({str(target)!r}) applies it in the base's generate")
    return target


def refuse_holding(target: Path, output: str, paths: list[tuple[str, Path]]) -> None:
    """Refuse an output folder that is, or holds, one of ``paths`` (by what it is): writing it would replace them.

    Raises:
        SystemExit: naming the first one held."""
    held = [what for what, path in paths if path == target or target in path.parents]
    if held:
        raise SystemExit(f"--output {output} holds {held[0]}, which writing the folder would replace: choose a new folder")


def load_adapter_state(adapter: Adapter, state_dict: dict[str, Any], where: str) -> None:
    """Load a checkpoint's trained adapter tensors (``policy.adapter.*``) into ``adapter``.

    Raises:
        SystemExit: a trainable tensor the checkpoint lacks, one it has that the adapter does not, or another shape.
    """
    saved = {k.removeprefix(ADAPTER_PREFIX): v for k, v in state_dict.items() if k.startswith(ADAPTER_PREFIX)}
    if problems := fit_problems(trained_keys(adapter), saved, adapter.state_dict()):  # as IPAModule.check_fits reads them
        raise SystemExit(f"{where}: its adapter tensors do not fit the adapter its configuration builds:\n  " + "\n  ".join(problems))
    adapter.load_state_dict(saved, strict=False)


def adapter_model(adapter: Adapter) -> PreTrainedModel:
    """The adapter as a causal LM of its family, whose own forward gives the adapter's logits: its body's config, its
    layers and an output head of V×H.

    A tied 'pretrained' head stays tied; any other head is written untied (``tie_word_embeddings=False``). A 'pretrained'
    head keeps its family's scaling of the logits (``ScaledHead``); the other heads never had it, so the config's
    scalings (``LOGIT_SCALINGS``) are switched off."""
    head = adapter.head
    scaled = isinstance(head, ScaledHead)
    head = head.linear if scaled else head
    tied = isinstance(head, nn.Linear) and head.weight is adapter.body.get_input_embeddings().weight
    if isinstance(head, ProjectedHead):  # lm_head(P·h) = (W·P)·h
        weight = (head.lm_head.weight.double() @ head.projection.weight.double()).to(head.projection.weight.dtype)
    else:
        weight = head.weight
    config = adapter.body.config.__class__.from_dict(adapter.body.config.to_dict())
    config.tie_word_embeddings = tied
    for field in LOGIT_SCALINGS if not scaled else ():
        if getattr(config.get_text_config(), field, None) is not None:
            setattr(config.get_text_config(), field, None if field == "final_logit_softcapping" else 1.0)
    model = AutoModelForCausalLM.from_config(config, dtype=weight.dtype)
    model.base_model.load_state_dict(adapter.body.state_dict())
    with torch.no_grad():
        model.get_output_embeddings().weight.copy_(weight)
        if getattr(model.get_output_embeddings(), "bias", None) is not None:
            model.get_output_embeddings().bias.zero_()
    return model.eval()


NEUTRAL = {  # generate fills a field left None from the base's own generation_config.json: every other one that changes
    # the sampled distribution is set to what leaves it as it is
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "typical_p": 1.0, "min_p": 0.0,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "suppress_tokens": [], "begin_suppress_tokens": [], "num_beams": 1,
}
# fields with no neutral value but None, which generate would then take from the base's generation_config.json
UNSET = ("bad_words_ids", "sequence_bias", "forced_bos_token_id", "forced_eos_token_id", "exponential_decay_length_penalty",
         "min_length", "top_h", "watermarking_config", "stop_strings", "prompt_lookup_num_tokens", "dola_layers", "assistant_model")


def generation_config(policy: TailoredPolicy) -> GenerationConfig:
    """``Sampling`` as transformers' ``GenerationConfig``: sampling with the run's temperature, top-k, top-p and
    ``max_new_tokens``, its stop tokens as ``eos_token_id`` (every one ends a row, as in ``TailoredPolicy``), its padding
    token, and every other field that changes the sampled distribution neutral (``NEUTRAL``). ``min_new_tokens`` is 0:
    ``AdapterLogitsProcessor`` bans the stop tokens itself, as the policy does (before a top-k base's support is taken).

    Warns where ``generate`` cannot follow ``Sampling``: ``min_tokens_to_keep`` above 1 (transformers keeps 1 when
    sampling), and a base whose own ``generation_config.json`` sets a field that has no neutral value (``UNSET``)."""
    s = policy.sampling
    if s.min_tokens_to_keep > 1:
        warnings.warn(f"sampling.min_tokens_to_keep={s.min_tokens_to_keep}: transformers' generate keeps at least 1 token when it "
                      "samples, so top-k/top-p there can keep fewer tokens than the policy did", stacklevel=2)
    own = read_generation_config(policy.base.path) if policy.base.path else None
    if own is not None and (set_there := [f for f in UNSET if getattr(own, f, None) not in (None, 0, [], {})]):
        warnings.warn(f"the base's generation_config.json sets {set_there}, which generate applies whatever the exported "
                      "generation_config says (it has no neutral value to override them with): reset them before generate, "
                      "e.g. base.generation_config = GenerationConfig(), for the policy's draws", stacklevel=2)
    return GenerationConfig(
        do_sample=True, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
        min_new_tokens=0, eos_token_id=list(policy.base.stop_ids), pad_token_id=policy.pad_id, **NEUTRAL,
    )


def same_file(tested: Optional[str], ckpt: Path, results: Path) -> bool:
    """Whether a ``results.json``'s ``checkpoint`` (absolute as ``TestResults`` writes it; relative to the folder the test
    ran in, by older ones: tried from here and from the results' run's ``save_dir``'s parent) is ``ckpt``."""
    if not tested:
        return False
    candidates = [Path(tested)] if Path(tested).is_absolute() else [Path(tested), *(parent / tested for parent in results.resolve().parents[2:4])]
    return any(c.resolve() == ckpt.resolve() for c in candidates)


def find_results(ckpt: Path) -> Optional[Path]:
    """The newest ``results.json`` of a ``test`` run of this checkpoint among the runs beside its own (``save_dir/name``)."""
    runs = ckpt.resolve().parents[2] if len(ckpt.resolve().parents) > 2 else None
    found = []
    for path in runs.glob("*/results.json") if runs is not None else []:
        try:
            tested = json.loads(path.read_text()).get("checkpoint")
        except (OSError, ValueError):
            continue
        if same_file(tested, ckpt, path):
            found.append(path)
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def model_card(hparams: dict[str, Any], checkpoint: dict[str, Any], ckpt: Path, base: LocalBase | RemoteBase,
               results: Optional[dict[str, Any]], results_path: Optional[Path]) -> str:
    """The folder's ``README.md``: what the adapter was trained for and with, its test metrics, and how to use it (the
    base as it was loaded: a hub name, or the local folder a file was converted into; its chat template if it used one)."""
    init = hparams["base"].get("init_args", {})
    name = init.get("name_or_path") or init.get("model") or "?"
    rollouts = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress", {}).get("total", {}).get("processed")

    def block(value: Any) -> str:
        return "```yaml\n" + yaml.safe_dump(value, sort_keys=False).strip() + "\n```"

    if isinstance(base, RemoteBase):
        load = [f"base = ...  # the model behind {init.get('base_url')} ({name}): its local weights, if you have them"]
    else:
        where = "" if base.path == name else f"  # {name}, as converted for training"
        load = [f"base = AutoModelForCausalLM.from_pretrained({base.path!r}){where}"]
    prompts = "['Your prompt']"
    if base.chat_template:  # the turns the base read in training: the system prompt's, if any, then the user's
        system = f"{{'role': 'system', 'content': {base.system_prompt!r}}}, " if base.system_prompt else ""
        prompts = f"[tokenizer.apply_chat_template([{system}{{'role': 'user', 'content': 'Your prompt'}}], tokenize=False, add_generation_prompt=True)]"
    lines = [
        "---", "library_name: transformers", f"base_model: {name}", "tags: [lightning_ipa, inference-time-policy-adapter]", "---", "",
        f"# IPA adapter for `{name}`", "",
        f"An Inference-time Policy Adapter (Lu et al., EMNLP 2023) trained with lightning_ipa: at every step the base's "
        f"log-probs and this model's logits make the tailored policy `log_softmax(base) + α·adapter`, α = {hparams.get('alpha', 1.0)}.",
        "", "## Use it", "", "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "from lightning_ipa import AdapterLogitsProcessor",
        "tokenizer = AutoTokenizer.from_pretrained('<this folder>', padding_side='left')  # the base's, with its pad token",
        *load,
        "ipa = AdapterLogitsProcessor.from_pretrained('<this folder>')",
        f"inputs = tokenizer({prompts}, return_tensors='pt', padding=True, add_special_tokens={not base.chat_template})",
        "out = base.generate(**inputs, logits_processor=[ipa.reset(inputs['attention_mask'])], generation_config=ipa.generation_config)",
        "```", "",
        "## Training", "",
        f"- checkpoint: `{ckpt}` (global step {checkpoint.get('global_step')}" + (f", {rollouts} rollouts)" if rollouts is not None else ")"),
        f"- reward: `{(hparams.get('reward') or {}).get('class_path')}`", block(hparams.get("reward")),
        f"- algorithm: `{(hparams.get('algorithm') or {}).get('class_path', 'lightning_ipa.algorithms.RLOO')}`", block(hparams.get("algorithm")),
        "- adapter", block(hparams.get("adapter")), "- decoding (`generation_config.json`)", block(hparams.get("sampling")), "",
        "## Test metrics", "",
    ]
    if results is None:
        lines.append("No `test` of this checkpoint was found beside its run (`python -m lightning_ipa test --ckpt_path ...`, then export again).")
    else:
        policies = list(dict.fromkeys(p for values in results["metrics"].values() for p in values))  # results.json's order
        lines += [f"From `{results_path}`: {results.get('prompts')} prompts × {results.get('samples_per_prompt')} samples per policy.", "",
                  "| metric | " + " | ".join(policies) + " |", "|---|" + "---|" * len(policies)]
        for metric, values in results["metrics"].items():
            lines.append(f"| {metric} | " + " | ".join("–" if values.get(p) is None else f"{values[p]:.4g}" for p in policies) + " |")
    return "\n".join(lines) + "\n"
