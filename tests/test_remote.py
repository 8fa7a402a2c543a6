"""Black-box bases: RemoteBase against a real HTTP server on 127.0.0.1 serving a tiny in-process model."""

import json
import re
import time
from pathlib import Path

import pytest
import torch
from tests.model_families import FAMILIES
from tests.tokenizer_families import TOKENIZER_FAMILIES
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from lightning_ipa import Adapter, AdapterConfig, LocalBase, RemoteBase, Sampling, TailoredPolicy
from lightning_ipa.cli import CONF, main
from lightning_ipa.remote import remote_token_bytes
from lightning_ipa.serving import CompletionsServer
from lightning_ipa.types import Prompts, position_ids

PROMPTS = ["The dog runs to the tree", "A child reads a book by", "The cat"]
TEXTS = ["The café of the house, über", "El niño 🙂 y la piña", "中文的句子 and $5.99"]  # Latin-1, emoji, CJK
SECRET = "sk-test-0123456789-do-not-leak"


def byte_twins(tokenizer: PreTrainedTokenizerBase) -> dict[int, int]:
    """SentencePiece byte-fallback pieces ``<0xNN>`` whose byte a piece also spells (a space: "▁") → that piece's id."""
    vocab = tokenizer.get_vocab()
    spelled = {i: chr(int(piece[3:5], 16)).replace(" ", "▁") for piece, i in vocab.items() if re.fullmatch(r"<0x[0-7][0-9A-F]>", piece)}
    return {i: vocab[piece] for i, piece in spelled.items() if piece in vocab}


def vllm_name(tokenizer: PreTrainedTokenizerBase, token_id: int) -> str:
    """vLLM's name for a token (``convert_ids_list_to_tokens``): ``decode([id])``, with the leading spaces that decode
    strips from a "▁" piece put back (vllm-project/vllm#48674)."""
    text, piece = tokenizer.decode([token_id], clean_up_tokenization_spaces=False), tokenizer.convert_ids_to_tokens(token_id)
    missing = (len(piece) - len(piece.lstrip("▁"))) - (len(text) - len(text.lstrip(" ")))
    return " " * max(missing, 0) + text


def save_family_lm(path: Path, family: str, head_std: float = 1.0) -> str:
    """A tiny Llama over a tokenizer family, its LM head drawn from N(0, head_std²). As in a trained LM, byte-fallback
    twins get no mass (the encoder never produces them): their output rows are zero, so their logit 0 stays far below the top k."""
    tokenizer = TOKENIZER_FAMILIES[family]()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, head_std)
        model.lm_head.weight[list(byte_twins(tokenizer))] = 0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=list(TOKENIZER_FAMILIES))
def family_lm(request, tmp_path_factory) -> str:
    return save_family_lm(tmp_path_factory.mktemp(request.param), request.param)


class FaultyServer(CompletionsServer):
    """Answers the next requests with the given faults ('500', '400', 'slow', 'not json', 'no logprobs'), then normally."""

    def __init__(self, model: str, faults: list[str]):
        super().__init__(model)
        self.faults = list(faults)
        self.authorizations: list[str] = []

    def handle(self, path, headers, body):
        self.authorizations.append(headers.get("Authorization", ""))
        fault = self.faults.pop(0) if self.faults else None
        if fault == "slow":
            time.sleep(0.5)
        elif fault in ("500", "400"):
            return int(fault), {"error": {"message": f"injected {fault}"}}
        elif fault == "not json":
            return 200, b"{not json"
        elif fault == "no logprobs":
            return 200, {"choices": [{"text": "x"}]}
        elif fault == "unknown token":
            return 200, {"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"<eos>": -0.5, "no such token in this vocabulary": -1.0}]}}]}
        elif fault in ("reversed", "no index"):  # choices out of order (with their index), or in order without one
            choices = super().complete(json.loads(body)["prompt"], 8)["choices"]
            return 200, {"choices": choices[::-1] if fault == "reversed" else [{k: v for k, v in c.items() if k != "index"} for c in choices]}
        elif fault == "one choice short":
            reply = super().complete(json.loads(body)["prompt"], 2)
            return 200, {"choices": reply["choices"][:-1]}
        elif isinstance(fault, dict):  # this top_logprobs[0]
            return 200, {"choices": [{"index": 0, "logprobs": {"top_logprobs": [fault]}}]}
        return super().handle(path, headers, body)


class ReplySizes(CompletionsServer):
    """Records how many entries each reply's top_logprobs has."""

    def __init__(self, model: str, **kwargs):
        super().__init__(model, **kwargs)
        self.sizes: list[int] = []

    def complete(self, prompts, k):
        reply = super().complete(prompts, k)
        self.sizes += [len(choice["logprobs"]["top_logprobs"][0]) for choice in reply["choices"]]
        return reply


@pytest.fixture
def server(tiny_llama):
    with FaultyServer(tiny_llama, []) as running:
        yield running


def remote(server, tiny_llama, **kwargs) -> RemoteBase:
    return RemoteBase(server.url, "tiny", tiny_llama, **{"top_logprobs": 8, "backoff": 0.01, **kwargs})


def test_every_token_string_maps_back_to_its_id(server, tiny_llama):
    base = remote(server, tiny_llama)
    names = [server.token_string(i) for i in range(base.vocab_size)]
    assert any(name.startswith("bytes:") for name in names)  # byte-level tokens that are no text on their own
    assert [base.ids[remote_token_bytes(name)] for name in names] == list(range(base.vocab_size))


def test_every_id_comes_back_through_the_api(family_lm):
    """One request for the whole vocabulary: every id comes back but the byte twins, whose name is their piece's."""
    with CompletionsServer(family_lm) as server:
        base = RemoteBase(server.url, "tiny", family_lm, top_logprobs=len(server.tokenizer))
        prompts = base.encode(TEXTS[:1])
        logprobs, _ = base(prompts.ids, prompts.mask, position_ids(prompts.mask))
        names = [server.token_string(i) for i in range(base.vocab_size)]
    twins = byte_twins(base.tokenizer)
    assert bool(twins) == ("<0x2C>" in base.tokenizer.get_vocab())  # "," and "<0x2C>": only SentencePiece with byte fallback has twins
    assert set(logprobs[0].isfinite().nonzero().flatten().tolist()) == set(range(base.vocab_size)) - set(twins)
    assert base.unmapped_tokens == 0 and base.requests == 1
    assert [base.ids[remote_token_bytes(name)] for name in names] == [twins.get(i, i) for i in range(base.vocab_size)]


def test_the_server_names_tokens_as_vllm_and_openai_do(family_lm):
    """vLLM's text where a token is whole text, OpenAI's ``bytes:\\xNN`` where it is part of a character; the names of a
    text's tokens spell the text."""
    with CompletionsServer(family_lm) as server:
        tokenizer = server.tokenizer
        differ = set()
        for token_id in range(len(tokenizer)):
            vllm, name = vllm_name(tokenizer, token_id), server.token_string(token_id)
            if "\ufffd" in vllm:
                assert name.startswith("bytes:")
            elif name != vllm:
                differ.add(tokenizer.convert_ids_to_tokens(token_id))
        assert differ == ({"<0x20>"} & tokenizer.get_vocab().keys())  # vLLM names it "": decoded alone, Strip removes the space
        for text in TEXTS:
            ids = tokenizer.encode(text, add_special_tokens=False)
            spelled = b"".join(remote_token_bytes(server.token_string(i)) for i in ids).decode()
            assert spelled.removeprefix(" ") == tokenizer.decode(ids)  # SentencePiece's "▁" before the first word is a space
    assert server.token_string(tokenizer.eos_token_id) == tokenizer.eos_token


def test_remote_base_gives_the_local_top_k_log_probs_in_every_family(family_lm):
    local = LocalBase(family_lm, dtype="float32", top_k=8)
    with CompletionsServer(family_lm) as server:
        far = RemoteBase(server.url, "tiny", family_lm, top_logprobs=8)
        prompts = local.encode(TEXTS)
        expected, _ = local(prompts.ids, prompts.mask, position_ids(prompts.mask))
        got, _ = far(prompts.ids, prompts.mask, position_ids(prompts.mask))
    assert torch.equal(got.isfinite(), expected.isfinite()) and (got.isfinite().sum(-1) == 8).all()
    assert torch.allclose(got[got.isfinite()], expected[expected.isfinite()], atol=1e-5) and far.unmapped_tokens == 0


def test_a_sampled_token_beyond_the_top_k_is_left_out(tmp_path):
    """vLLM adds the sampled token to the top k when it is not among them: the base keeps the k most likely."""
    flat = save_family_lm(tmp_path, "sentencepiece_byte_fallback", head_std=0.3)  # samples often fall outside the top 2
    local = LocalBase(flat, dtype="float32", top_k=2)
    with ReplySizes(flat, add_sampled_token=True) as server:
        far = RemoteBase(server.url, "tiny", flat, top_logprobs=2, max_concurrency=1)
        prompts = local.encode(PROMPTS + TEXTS)
        expected, _ = local(prompts.ids, prompts.mask, position_ids(prompts.mask))
        got, _ = far(prompts.ids, prompts.mask, position_ids(prompts.mask))
    assert 3 in server.sizes and set(server.sizes) <= {2, 3}  # some replies had k + 1 entries
    assert torch.equal(got.isfinite(), expected.isfinite()) and (got.isfinite().sum(-1) == 2).all()
    assert torch.allclose(got[got.isfinite()], expected[expected.isfinite()], atol=1e-5)


def test_a_reply_of_k_plus_one_entries_gives_its_k_highest_first_in_reply_order(tiny_llama):
    with FaultyServer(tiny_llama, []) as server:
        base = remote(server, tiny_llama, top_logprobs=2)
        comma, dot = base.ids[b","], base.ids[b"."]
        server.faults = [{",": -3.0, "<eos>": -0.5, ".": -3.0}]  # a tie for the second place: the first in the reply wins
        prompts = base.encode(PROMPTS[:1])
        logprobs, _ = base(prompts.ids, prompts.mask, position_ids(prompts.mask))
    assert logprobs.isfinite().sum() == 2 and logprobs[0, base.tokenizer.eos_token_id] == -0.5 and logprobs[0, comma] == -3.0
    assert logprobs[0, dot] == float("-inf")


def test_remote_base_gives_the_local_top_k_log_probs(server, tiny_llama):
    local, far = LocalBase(tiny_llama, dtype="float32", top_k=8), remote(server, tiny_llama)
    prompts = local.encode(PROMPTS)
    expected, _ = local(prompts.ids, prompts.mask, position_ids(prompts.mask))
    got, _ = far(prompts.ids, prompts.mask, position_ids(prompts.mask))
    assert torch.equal(got.isfinite(), expected.isfinite()) and (got.isfinite().sum(-1) == 8).all()
    assert torch.allclose(got[got.isfinite()], expected[expected.isfinite()], atol=1e-5)
    assert far.requests == 1 and server.requests == 1 and far.unmapped_tokens == 0  # all rows in one request


def test_a_batch_of_prompts_is_answered_as_each_prompt_alone(tiny_llama):
    """The server's batched, left-padded forward gives each prompt the log-probs it gets alone."""
    with CompletionsServer(tiny_llama) as server:
        tokenizer = server.tokenizer
        prompts = [tokenizer.encode(text) for text in PROMPTS + TEXTS]
        together = server.complete(prompts, 5)["choices"]
        alone = [server.complete([prompt], 5)["choices"][0] for prompt in prompts]
    assert [choice["index"] for choice in together] == list(range(len(prompts)))
    for a, b in zip(together, alone):
        a, b = a["logprobs"]["top_logprobs"][0], b["logprobs"]["top_logprobs"][0]
        assert list(a) == list(b) and all(abs(a[name] - b[name]) < 1e-5 for name in a)


def test_tailored_sampling_through_the_api_equals_the_local_top_k_base(server, tiny_llama):
    """Same seed, same tokens: the tailored distribution lives on the base's top-k support in both."""
    sampling = Sampling(max_new_tokens=6, top_p=0.95)

    def policy(base):
        adapter = Adapter.build(AdapterConfig(name_or_path=tiny_llama, num_layers=2, head="zeros"), base)
        torch.nn.init.normal_(adapter.head.weight, std=2.0, generator=torch.Generator().manual_seed(0))  # a non-trivial adapter
        return TailoredPolicy(base, adapter, 1.0, sampling)

    local, far = policy(LocalBase(tiny_llama, dtype="float32", top_k=8)), policy(remote(server, tiny_llama))
    a = local.sample(local.base.encode(PROMPTS), torch.Generator().manual_seed(3), samples_per_prompt=2)
    b = far.sample(far.base.encode(PROMPTS), torch.Generator().manual_seed(3), samples_per_prompt=2)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.response_mask, b.response_mask)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    real = b.response_mask.bool()
    assert (b.base_distribution[real].isfinite().sum(-1) == 8).all()  # the rollout keeps the support: the loss sees it too
    assert torch.allclose(far(b, with_kl=True).logprobs, b.logprobs, atol=1e-4)
    # one request per decoding step, for all unfinished rows: as many as the longest response has tokens
    assert far.base.requests == int(b.response_mask.sum(-1).max()) and far.base.unmapped_tokens == 0
    assert server.connections == 1  # one connection kept open across the steps


def test_the_servers_prefix_cache_reads_each_new_token_once_and_changes_no_answer(tiny_llama):
    """As vLLM's prefix caching: a prompt that extends a kept one by a token reads that token alone."""
    sampling = Sampling(max_new_tokens=6, min_new_tokens=6)
    rollouts = []
    with CompletionsServer(tiny_llama) as cached, CompletionsServer(tiny_llama, prefix_cache=0) as uncached:
        for server in (cached, uncached):
            policy = TailoredPolicy(remote(server, tiny_llama), None, sampling=sampling)
            prompts = policy.encode(PROMPTS)
            rollouts.append(policy.sample(prompts, torch.Generator().manual_seed(2), samples_per_prompt=2))
    (a, b), rows = rollouts, 2 * len(PROMPTS)
    assert torch.equal(a.response_ids, b.response_ids) and torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert cached.computed_tokens == int(prompts.mask.sum()) + rows * 5  # the prompts once, then each row's new token
    # without it, each step reads every row whole: the prompts, then 2 rows × (prompt + 1..5 response tokens) per prompt
    assert uncached.computed_tokens == int(prompts.mask.sum()) * (1 + 2 * 5) + rows * sum(range(1, 6))
    assert 0 < len(cached.prefixes) <= len(PROMPTS) + rows * 5 and not uncached.prefixes  # rows alike so far share one


def test_choices_are_matched_to_prompts_by_index_or_else_in_order(tiny_llama):
    with FaultyServer(tiny_llama, []) as server:
        base = remote(server, tiny_llama)
        prompts = base.encode(PROMPTS)
        expected, _ = base(prompts.ids, prompts.mask, position_ids(prompts.mask))
        for fault in ("reversed", "no index"):
            server.faults = [fault]
            got, _ = base(prompts.ids, prompts.mask, position_ids(prompts.mask))
            assert torch.equal(got, expected), fault


def test_a_remote_rollout_whose_rows_end_at_different_steps_keeps_each_rows_top_k(tmp_path):
    """Finished rows get log-probs 0 over the whole vocabulary (they sample padding): not a support wider than k."""
    path = str(FAMILIES["gpt2"].save(tmp_path))
    with CompletionsServer(path) as server:
        base = RemoteBase(server.url, "tiny", path, top_logprobs=6, stop_tokens=list(range(3, 40)))  # rows end at different steps
        policy = TailoredPolicy(base, None, sampling=Sampling(max_new_tokens=12))
        assert policy.rollout_memory(4) == "top_k"
        rollout = policy.sample(policy.encode(["A", "The cat", "hello world", "The dog runs"]), torch.Generator().manual_seed(3))
    lengths = rollout.response_mask.sum(-1)
    assert lengths.min() < lengths.max()
    real = rollout.response_mask.bool()
    assert (rollout.base_distribution[real].isfinite().sum(-1) == 6).all()


def test_rows_per_request_splits_a_step_into_concurrent_requests(server, tiny_llama):
    """``rows_per_request=1`` is one request per unfinished row (the completions API with one prompt): same tokens."""
    sampling = Sampling(max_new_tokens=5, top_p=0.95)
    one, split = (TailoredPolicy(remote(server, tiny_llama, rows_per_request=n), None, sampling=sampling) for n in (None, 1))
    a, b = (policy.sample(policy.base.encode(PROMPTS), torch.Generator().manual_seed(1), samples_per_prompt=2) for policy in (one, split))
    assert torch.equal(a.response_ids, b.response_ids) and torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    # the first token: one request per prompt (its samples share it); then one per unfinished row and token
    assert split.base.requests == len(PROMPTS) + int(b.response_mask.sum()) - len(b.response_ids)
    assert one.base.requests == int(a.response_mask.sum(-1).max())
    with pytest.raises(ValueError, match="rows_per_request=0: give a positive number"):
        remote(server, tiny_llama, rows_per_request=0)


def test_a_one_token_wide_batch_is_read_once(tiny_gpt2_other_vocab):
    """The first step sends each prompt as it is (a GPT-2 at its random init: context shifts its log-probs)."""
    with CompletionsServer(tiny_gpt2_other_vocab) as server:
        bases = LocalBase(tiny_gpt2_other_vocab, dtype="float32", top_k=8), RemoteBase(server.url, "tiny", tiny_gpt2_other_vocab, top_logprobs=8)
        policies = [TailoredPolicy(base, None, sampling=Sampling(max_new_tokens=4, min_new_tokens=4)) for base in bases]
        prompt = Prompts(torch.tensor([[100], [150]]), torch.ones(2, 1, dtype=torch.long))
        local, far = (policy.sample(prompt, torch.Generator().manual_seed(4)) for policy in policies)
        assert torch.equal(local.response_ids, far.response_ids) and torch.allclose(local.logprobs, far.logprobs, atol=1e-6)


@pytest.mark.parametrize(
    "faults, message",
    [
        (["500"] * 3, "failed 3 times; last: HTTP 500"),
        (["not json"] * 3, r"failed 3 times; last: malformed reply \(JSONDecodeError"),
        (["no logprobs"] * 3, r"failed 3 times; last: malformed reply \(KeyError: 'logprobs'"),
        (["slow"] * 3, "failed 3 times; last: no reply within 0.2 s"),
        (["one choice short"] * 3, r"failed 3 times; last: malformed reply \(ValueError: 1 choices \(indices \[0\]\) for 2 prompts"),
    ],
)
def test_failures_are_retried_then_reported(tiny_llama, faults, message):
    with FaultyServer(tiny_llama, faults) as server:
        base = remote(server, tiny_llama, max_retries=2, timeout=0.2)
        prompts = base.encode(PROMPTS[:2] if "one choice short" in faults else PROMPTS[:1])
        with pytest.raises(RuntimeError, match=message):
            base(prompts.ids, prompts.mask, position_ids(prompts.mask))
        assert base.requests == 3
        server.faults = ["500", "slow"]  # two failures, then an answer: within the retries
        logprobs, _ = base(prompts.ids, prompts.mask, position_ids(prompts.mask))
        assert (logprobs.isfinite().sum(-1) == 8).all() and base.requests == 6


def test_client_errors_are_not_retried(tiny_llama):
    with FaultyServer(tiny_llama, ["400"]) as server:
        base = remote(server, tiny_llama)
        prompts = base.encode(PROMPTS[:1])
        with pytest.raises(RuntimeError, match="answered HTTP 400: .*injected 400"):
            base(prompts.ids, prompts.mask, position_ids(prompts.mask))
        assert base.requests == 1


def test_distill_then_fit_against_the_proxy_then_test_on_the_api(server, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    api = [f"--model.base.init_args.base_url={server.url}", f"--model.base.init_args.tokenizer={tiny_llama}", "--model.base.init_args.chat_template=false"]
    quick = ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path}",
             "--data.init_args.train_size=8", "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=4"]
    proxy = tmp_path / "proxy"
    main(["distill", "--config", str(CONF / "blackbox" / "distill.yaml"), *quick, "--trainer.max_steps=2",
          f"--model.teacher.init_args.base_url={server.url}", f"--model.teacher.init_args.tokenizer={tiny_llama}",
          "--model.teacher.init_args.chat_template=false", "--model.sampling.max_new_tokens=5",
          f"--model.student={tiny_llama}", f"--model.output_dir={proxy}", "--model.lr=1e-3"])
    assert (proxy / "config.json").is_file() and (proxy / "tokenizer.json").is_file()
    student, original = LocalBase(str(proxy), dtype="float32"), LocalBase(tiny_llama, dtype="float32")
    assert any(not torch.equal(a, b) for a, b in zip(student.lm.state_dict().values(), original.lm.state_dict().values()))
    distilled = server.requests

    ipa = ["--config", str(CONF / "blackbox" / "ipa.yaml"), *quick, "--data.init_args.val_size=4", "--model.sampling.max_new_tokens=5",
           "--model.max_rollouts=2", "--trainer.val_check_interval=2", "--model.algorithm.init_args.epochs=1",
           "--model.algorithm.init_args.minibatch_size=null", "--model.base.chat_template=false", "--model.base.top_k=8",
           f"--model.base.name_or_path={proxy}", f"--model.adapter.name_or_path={proxy}"]
    main(["fit", *ipa])
    assert server.requests == distilled  # training ran against the proxy, not the API
    main(["test", *ipa, "--config", str(CONF / "blackbox" / "remote_base.yaml"), *api, "--model.base.init_args.top_logprobs=8", "--ckpt_path", "last"])
    results = json.loads((tmp_path / "blackbox" / "version_1" / "results.json").read_text())
    assert results["metrics"]["coverage"].keys() == {"base", "tailored"} and server.requests > distilled
    assert set(server.authorizations) == {f"Bearer {SECRET}"}  # sent with every request ...
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".ckpt" for p in written) and any(p.name == "config.yaml" for p in written)
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]  # ... and stored nowhere: hparams, logs, checkpoints


def test_unknown_token_strings_are_dropped_and_counted(tiny_llama):
    with FaultyServer(tiny_llama, ["unknown token"]) as server:
        base = remote(server, tiny_llama)
        prompts = base.encode(PROMPTS[:1])
        logprobs, _ = base(prompts.ids, prompts.mask, position_ids(prompts.mask))
        assert logprobs.isfinite().sum() == 1 and logprobs[0, base.tokenizer.eos_token_id] == -0.5
        assert base.unmapped_tokens == 1


def test_a_reply_of_which_no_token_maps_fails_clearly_rather_than_sampling_nan(tiny_llama):
    with FaultyServer(tiny_llama, [{"no such token": -0.1, "nor this one": -2.5}]) as server:
        base = remote(server, tiny_llama)
        prompts = base.encode(PROMPTS[:1])
        with pytest.raises(RuntimeError, match=r"none of the 2 tokens .* maps to an id of the tokenizer .*'no such token'.*served model's own tokenizer"):
            base(prompts.ids, prompts.mask, position_ids(prompts.mask))


def test_a_remote_bases_context_window_and_stop_tokens_are_settings(server, tiny_llama):
    """A server's window is not in its tokenizer folder: ``context_window`` makes long prompts fail before any request."""
    base = remote(server, tiny_llama, context_window=16, stop_tokens=["<pad>", "<eos>"])
    assert base.stop_ids == sorted([base.tokenizer.pad_token_id, base.tokenizer.eos_token_id])
    policy = TailoredPolicy(base, Adapter.build(AdapterConfig(name_or_path=tiny_llama, num_layers=1), base), sampling=Sampling(max_new_tokens=8))
    assert policy.context_window() == 8
    with pytest.raises(ValueError, match=r"longer than the 8 tokens that fit in the context window \(base 16, adapter 256\) before max_new_tokens=8"):
        policy.encode(["The dog runs to the tree and the cat sleeps on the warm roof."])
    assert base.requests == 0
    assert remote(server, tiny_llama).max_positions is None  # unknown: the server refuses what it cannot read


def test_quark_replay_and_adapter_from_a_remote_base_fail_clearly(server, tiny_llama):
    base = remote(server, tiny_llama)
    with pytest.raises(NotImplementedError, match="cannot re-read stored responses.*RLOO or PPO.*distill"):
        base.response_logprobs(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="the base is remote.*set adapter.name_or_path"):
        Adapter.build(AdapterConfig(), base)
