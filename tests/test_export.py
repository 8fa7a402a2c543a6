"""``python -m lightning_ipa export`` and ``AdapterLogitsProcessor``: a trained adapter in plain transformers' ``generate``
draws, for the same seed, the tokens ``TailoredPolicy.generate`` draws."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, GenerationConfig

from conftest import save_tiny_llama, train_tokenizer
from model_families import save_tiny_qwen2
from lightning_ipa import Adapter, AdapterConfig, LocalBase, Sampling, TailoredPolicy
from lightning_ipa.algorithms import Quark
from lightning_ipa.cli import main
from lightning_ipa.export import export_adapter, load_adapter_state
from lightning_ipa.module import trained_keys
from lightning_ipa.processor import AdapterLogitsProcessor
from test_cli import tiny_args

PROMPTS = ["The dog runs", "A child reads a book by", "Write one sentence that uses", "cat"]


def save_soft_llama(path: Path, seed: int) -> str:
    """The tiny Llama with a 0.15× output head: varied samples (the unscaled one repeats one token)."""
    save_tiny_llama(path, seed=seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.15)
    model.save_pretrained(path)
    return str(path)


def save_softcapped_gemma2(path: Path) -> str:
    """A 2-layer Gemma 2 whose forward softcaps its logits at 2 (cap·tanh(logits / cap)): far from its head's raw logits."""
    tokenizer = train_tokenizer(300, ["<eos>", "<pad>"])
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=128, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        final_logit_softcapping=2.0))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A real ``fit`` checkpoint (2 rollouts through the CLI) of an adapter built from the base's first 2 layers, its
    ``test`` results, and a second model of the same tokenizer (another seed) to build an adapter from its own checkpoint."""
    root = tmp_path_factory.mktemp("export")
    base, other = save_soft_llama(root / "base", 0), save_soft_llama(root / "other", 1)
    args = tiny_args(base, root / "runs", 2, "--model.sampling.temperature=2.0", "--model.base.init_args.dtype=float32")
    main(["fit", *args])
    ckpt = root / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    main(["test", *args, "--ckpt_path", str(ckpt)])
    return root, base, other, ckpt


def variant(fitted, name: str, adapter: dict, sampling: dict, algorithm=None, base_args=None) -> tuple[Path, TailoredPolicy]:
    """The fitted checkpoint with another base / adapter / decoding / algorithm configuration and random trained tensors
    (so that the adapter moves the policy far from the base), saved as a new checkpoint; and our policy built from it."""
    root, _, _, ckpt = fitted
    checkpoint = torch.load(ckpt, weights_only=False)
    hparams = checkpoint["hyper_parameters"]
    hparams["base"]["init_args"].update(base_args or {})
    hparams["adapter"].update(adapter)
    hparams["sampling"].update(sampling)
    base = LocalBase(**{**hparams["base"]["init_args"], "dtype": "float32"})
    built = Adapter.build(AdapterConfig(**hparams["adapter"]), base)
    if algorithm is not None:
        hparams["algorithm"] = algorithm
        Quark(**algorithm["init_args"]).setup(built)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in built.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    # what IPAModule checkpoints of the adapter: its trained keys, a tied head under both of its names
    checkpoint["state_dict"] = {f"policy.adapter.{k}": v.clone() for k, v in built.state_dict().items() if k in trained_keys(built)}
    path = root / f"{name}.ckpt"
    torch.save(checkpoint, path)
    load_adapter_state(built, checkpoint["state_dict"], str(path))
    return path, TailoredPolicy(base, built, hparams["alpha"], Sampling(**hparams["sampling"]))


def draws_of_generate(folder: Path, base_path: str, seed: int, alpha=None) -> torch.Tensor:
    """The response tokens [B, T] of plain transformers' ``generate`` on the base with the exported processor (α as
    trained, or ``alpha``) and generation config, after ``torch.manual_seed(seed)`` (padding after a row's end)."""
    ipa = AdapterLogitsProcessor.from_pretrained(str(folder), alpha=alpha)
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    torch.manual_seed(seed)
    out = base.generate(**inputs, logits_processor=[ipa.reset(inputs["attention_mask"])], generation_config=ipa.generation_config)
    return out[:, inputs["input_ids"].shape[1]:]


def draws_of_ours(policy: TailoredPolicy, seed: int, pad: int, use_adapter: bool = True) -> torch.Tensor:
    responses = policy.generate(policy.encode(PROMPTS), torch.Generator().manual_seed(seed), use_adapter=use_adapter)
    return responses.response_ids.masked_fill(responses.response_mask == 0, pad)


SAMPLING = {"temperature": 1.0, "top_p": 0.9, "top_k": 0, "max_new_tokens": 12, "min_new_tokens": 3}
CASES = {
    "projection head from the base's layers": ({"head": "projection"}, SAMPLING, None),
    "a base trained on its top-k support": ({"head": "projection"}, SAMPLING, None, {"top_k": 5}),
    "a base whose own generation config penalises repetition": ({"head": "zeros"}, SAMPLING, None, {"name_or_path": "penalised"}),
    "a Qwen2 base (per-layer types) and a 1-layer adapter": ({"head": "projection", "num_layers": 1}, SAMPLING, None, {"name_or_path": "qwen2"}),
    "a Gemma 2 base (softcapped logits) and its pretrained head": ({"head": "pretrained", "num_layers": 1}, SAMPLING, None, {"name_or_path": "gemma2"}),
    "a Gemma 2 base (softcapped logits) and a projection head": ({"head": "projection", "num_layers": 1}, SAMPLING, None, {"name_or_path": "gemma2"}),
    "zeros head, top-k 20 at temperature 1.5": ({"head": "zeros"}, {**SAMPLING, "top_k": 20, "temperature": 1.5, "top_p": 1.0}, None),
    "pretrained head of its own checkpoint": ({"head": "pretrained", "name_or_path": "other", "num_layers": None}, SAMPLING, None),
    "Quark's prefix control code": ({"head": "projection"}, SAMPLING, {"class_path": "lightning_ipa.algorithms.Quark", "init_args": {"quantiles": 3}}),
    "Quark's code on every token": ({"head": "projection"}, SAMPLING, {"class_path": "lightning_ipa.algorithms.Quark",
                                                                      "init_args": {"quantiles": 3, "control": "every_token"}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_exported_adapter_in_transformers_generate_draws_what_our_sampler_draws(fitted, tmp_path, case):
    adapter, sampling, algorithm, *base_args = CASES[case]
    base_args = dict(*base_args)
    if adapter.get("name_or_path") == "other":
        adapter = {**adapter, "name_or_path": fitted[2]}
    if base_args.get("name_or_path") == "penalised":  # generate fills unset fields from the base's generation_config.json
        shutil.copytree(fitted[1], tmp_path / "penalised")
        GenerationConfig(eos_token_id=0, do_sample=True, repetition_penalty=1.3, no_repeat_ngram_size=2, min_p=0.2, top_k=3).save_pretrained(tmp_path / "penalised")
        base_args["name_or_path"] = str(tmp_path / "penalised")
    if base_args.get("name_or_path") == "qwen2":
        base_args["name_or_path"] = str(save_tiny_qwen2(tmp_path / "qwen2"))
    if base_args.get("name_or_path") == "gemma2":
        base_args["name_or_path"] = save_softcapped_gemma2(tmp_path / "gemma2")
    ckpt, policy = variant(fitted, case.split()[0], adapter, sampling, algorithm, base_args)
    folder = export_adapter(str(ckpt), str(tmp_path / "adapter"))
    base_path, pad = policy.base.path, policy.pad_id
    tailored = [draws_of_ours(policy, seed, pad) for seed in range(6)]
    assert len({tuple(t.flatten().tolist()) for t in tailored}) == 6  # the draws vary with the seed
    for seed, ours in enumerate(tailored):
        theirs = draws_of_generate(folder, base_path, seed)
        assert torch.equal(theirs, ours[:, : theirs.shape[1]]) and (ours[:, theirs.shape[1]:] == pad).all(), (case, seed)
    for seed in range(2):  # with α = 0 the processor is the base alone, as our evaluation draws it
        base_alone = draws_of_ours(policy, seed, pad, use_adapter=False)
        assert not torch.equal(base_alone, tailored[seed])
        theirs = draws_of_generate(folder, base_path, seed, alpha=0.0)
        assert torch.equal(theirs, base_alone[:, : theirs.shape[1]]) and (base_alone[:, theirs.shape[1]:] == pad).all(), (case, seed)


def test_export_cli_writes_a_transformers_folder_with_a_model_card(fitted, tmp_path):
    root, base, _, ckpt = fitted
    out = tmp_path / "adapter"
    assert main(["export", "--ckpt_path", str(ckpt), "--output", str(out)]) is None
    assert {"config.json", "model.safetensors", "generation_config.json", "ipa_adapter.json", "README.md", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    lm = AutoModelForCausalLM.from_pretrained(out)  # plain transformers reads it: the adapter's 2 layers and a V×H head
    assert lm.config.num_hidden_layers == 2 and not lm.config.tie_word_embeddings
    meta = json.loads((out / "ipa_adapter.json").read_text())
    assert meta["alpha"] == 1.0 and meta["control"] is None and meta["never_sampled"] == [AutoTokenizer.from_pretrained(out).pad_token_id]
    card = (out / "README.md").read_text()
    code = card.partition("```python\n")[2].partition("```")[0].replace("<this folder>", str(out))
    namespace: dict = {}
    exec(code, namespace)  # the card's example runs as written (the base as loaded for training)
    assert namespace["out"].shape[1] > namespace["inputs"]["input_ids"].shape[1]
    results = json.loads((root / "runs" / "quickstart" / "version_1" / "results.json").read_text())
    assert f"base_model: {base}" in card and "tasks.quickstart.ConceptCoverage" in card and "lightning_ipa.algorithms.RLOO" in card
    assert f"| coverage | {results['metrics']['coverage']['base']:.4g} | {results['metrics']['coverage']['tailored']:.4g} |" in card
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["top_p"], generation["top_k"], generation["max_new_tokens"]) == (True, 0.9, 0, 6)

    with pytest.raises(SystemExit, match="exists: choose another folder, or pass --overwrite true"):
        main(["export", "--ckpt_path", str(ckpt), "--output", str(out)])
    main(["export", "--ckpt_path", str(ckpt), "--output", str(out), "--overwrite", "true"])
    with pytest.raises(SystemExit, match="no such file"):
        main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--output", str(tmp_path / "x")])
    (tmp_path / "afile").write_text("")
    for output, message in [(tmp_path / "afile", "is a file"), (ckpt.parents[1], "holds the checkpoint"), (Path("."), "holds the working directory")]:
        with pytest.raises(SystemExit, match=message):
            export_adapter(str(ckpt), str(output), overwrite=True)
    assert ckpt.is_file()
    with pytest.raises(SystemExit, match="--results .*: no such file"):
        export_adapter(str(ckpt), str(tmp_path / "x"), results=str(tmp_path / "missing.json"))
    other = json.loads((root / "runs" / "quickstart" / "version_1" / "results.json").read_text())
    (tmp_path / "other.json").write_text(json.dumps({**other, "checkpoint": str(tmp_path / "another.ckpt")}))
    with pytest.raises(SystemExit, match="the results of a test of .*another.ckpt, not of"):
        export_adapter(str(ckpt), str(tmp_path / "x"), results=str(tmp_path / "other.json"))
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_checkpoint_that_does_not_fit_its_adapter(fitted, tmp_path):
    checkpoint = torch.load(fitted[3], weights_only=False)
    checkpoint["hyper_parameters"]["adapter"]["head"] = "zeros"  # the saved tensors are a projection's
    torch.save(checkpoint, tmp_path / "odd.ckpt")
    with pytest.raises(SystemExit, match=r"configured but not in the checkpoint: head.weight\n  in the checkpoint but not configured: head.projection.weight"):
        export_adapter(str(tmp_path / "odd.ckpt"), str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


def test_processor_refuses_beam_search_and_unmasked_left_padding(fitted, tmp_path):
    ckpt, _ = variant(fitted, "beams", {"head": "projection"}, SAMPLING)
    folder = export_adapter(str(ckpt), str(tmp_path / "adapter"))
    ipa = AdapterLogitsProcessor.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(fitted[1])
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="beam search"):
        base.generate(**inputs, logits_processor=[ipa.reset(inputs["attention_mask"])], num_beams=2, do_sample=False, max_new_tokens=4)
    with pytest.raises(ValueError, match="look left-padded"):
        base.generate(**inputs, logits_processor=[ipa.reset()], generation_config=ipa.generation_config)
    padded = tokenizer(PROMPTS, return_tensors="pt", padding="max_length", max_length=16)  # every row starts with the dedicated pad
    with pytest.raises(ValueError, match="look left-padded"):
        base.generate(**padded, logits_processor=[ipa.reset()], generation_config=ipa.generation_config)
    one = tokenizer(PROMPTS[1:2], return_tensors="pt")
    with pytest.raises(ValueError, match="assisted generation or prompt lookup"):
        base.generate(**one, logits_processor=[ipa.reset(one["attention_mask"])], prompt_lookup_num_tokens=2, do_sample=False, max_new_tokens=8)


def test_export_refuses_to_replace_the_base_and_warns_of_generation_settings_it_cannot_override(fitted, tmp_path):
    shutil.copytree(fitted[1], tmp_path / "base")
    ckpt, policy = variant(fitted, "own", {"head": "projection"}, SAMPLING, base_args={"name_or_path": str(tmp_path / "base")})
    with pytest.raises(SystemExit, match="holds the base's weights"):
        export_adapter(str(ckpt), str(tmp_path), overwrite=True)
    GenerationConfig(eos_token_id=0, bad_words_ids=[[5]], sequence_bias={(6,): 2.0}).save_pretrained(tmp_path / "base")
    with pytest.warns(UserWarning, match=r"sets \['bad_words_ids', 'sequence_bias'\].*base.generation_config = GenerationConfig\(\)"):
        export_adapter(str(ckpt), str(tmp_path / "adapter"))
    assert "min_length" not in json.loads((tmp_path / "adapter" / "generation_config.json").read_text())  # beside min_new_tokens it warns


def test_the_readme_example_runs_as_written(fitted, tmp_path):
    """README's "Use a trained adapter" code, with the tiny base and an exported folder in place of its names."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = readme.partition("## Use a trained adapter")[2].partition("```python\n")[2].partition("```")[0]
    assert 0 < len(code.strip().splitlines()) < 10
    ckpt, _ = variant(fitted, "readme", {"head": "projection"}, SAMPLING)
    folder = export_adapter(str(ckpt), str(tmp_path / "adapter"))
    namespace: dict = {}
    exec(code.replace("adapters/toxicity", str(folder)).replace("gpt2-large", fitted[1]), namespace)
    prompts = namespace["inputs"]["input_ids"]
    assert namespace["out"].shape[0] == 2 and namespace["out"].shape[1] > prompts.shape[1]


@pytest.mark.parametrize("head", ["pretrained", "projection"])
def test_the_adapter_and_its_export_give_the_logits_of_their_families_forward(tmp_path, head):
    """A 'pretrained' head is the checkpoint's own distribution, softcapping included (Gemma 2: cap·tanh(logits / cap));
    the exported LM's own forward gives the adapter's logits for every head (a projection head never had the softcap,
    so the exported config drops it)."""
    from lightning_ipa.bases import load_causal_lm
    from lightning_ipa.export import adapter_model

    path = save_softcapped_gemma2(tmp_path / "gemma2")
    base = LocalBase(path, dtype="float32")
    adapter = Adapter.build(AdapterConfig(num_layers=1, head=head), base)
    prompts = base.encode(PROMPTS)
    positions = (prompts.mask.cumsum(-1) - 1).clamp(min=0)

    def adapter_logits():
        return adapter.head(adapter(prompts.ids, prompts.mask, positions)[0][:, -1])

    if head == "pretrained":  # as loaded: the checkpoint's own forward
        own = load_causal_lm(path, "float32", num_hidden_layers=1)(input_ids=prompts.ids, attention_mask=prompts.mask, position_ids=positions).logits[:, -1]
        torch.testing.assert_close(adapter_logits(), own, atol=1e-5, rtol=1e-5)
        assert own.abs().max() <= 2.0  # softcapped
    with torch.no_grad():  # trained
        for p in adapter.head.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    exported = adapter_model(adapter)(input_ids=prompts.ids, attention_mask=prompts.mask, position_ids=positions).logits[:, -1]
    torch.testing.assert_close(exported, adapter_logits(), atol=1e-5, rtol=1e-5)


def test_what_generate_cannot_follow_is_said_and_the_card_keeps_the_base_s_chat_turns(fitted, tmp_path):
    """``min_tokens_to_keep`` above 1 (transformers keeps 1 when it samples) warns at export; the card's example renders
    prompts with the system turn and chat template the base read in training."""
    from model_families import save_tiny_llama as save_chat_llama

    from lightning_ipa.export import generation_config, model_card

    _, policy = variant(fitted, "keep", {"head": "projection"}, {**SAMPLING, "min_tokens_to_keep": 2})
    with pytest.warns(UserWarning, match="min_tokens_to_keep=2: transformers' generate keeps at least 1 token"):
        generation_config(policy)
    chat = LocalBase(str(save_chat_llama(tmp_path / "chat")), dtype="float32", chat_template=True, system_prompt="Be kind.")
    hparams = {"base": {"class_path": "lightning_ipa.LocalBase", "init_args": {"name_or_path": chat.path}}}
    card = model_card(hparams, {}, tmp_path / "x.ckpt", chat, None, None)
    assert "[{'role': 'system', 'content': 'Be kind.'}, {'role': 'user', 'content': 'Your prompt'}]" in card
    assert "add_special_tokens=False" in card
