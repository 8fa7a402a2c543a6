"""What validation and test measure, and the frozen models that evaluation alone needs."""

from __future__ import annotations

import sys
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from .bases import BaseDType, load_causal_lm, load_tokenizer, max_positions, resolve_pretrained
from .data import PromptBatch, repeat_prompts
from .frozen import Frozen
from .metrics import CorpusDistinctN, DistinctN, DistinctVariant, MeanScore, Samples
from .policy import TailoredPolicy

Stage = Literal["val", "test"]
POLICIES = ("tailored", "base")
Scorer = Callable[[PromptBatch, list[str]], dict[str, Tensor]]  # (batch of prompts, responses) → scores [N] by name


class Evaluation(Frozen):
    """Validation, test and predict: samples k responses per prompt from the tailored policy and the base alone (in
    ``test`` also from each training-free policy compared, ``IPAModule(compare=...)``), scores them and measures each
    with torchmetrics: the same prompts, seeds, sampling settings and metrics for every policy.

    Each sample is scored by the reward (``reward`` and its parts, through ``IPAModule.score``) and by ``score``
    (scores only evaluation needs, e.g. fluency under an evaluation LM); ``metrics`` aggregate those scores. This
    default logs the mean reward and its parts, distinct-2 and corpus distinct-2; a task subclasses it for its protocol
    (``metrics``, ``score``). It also keeps what callbacks show: ``samples`` (a few validation samples, for
    ``SampleTable``) and ``generations`` (every test sample with its scores, for ``TestResults``). Its models are
    frozen, move with the module and are never checkpointed.
    """

    def __init__(self, samples_per_prompt: int = 1, val_samples_per_prompt: int = 1, distinct_variant: DistinctVariant = "dexperts"):
        """
        Args:
            samples_per_prompt: Samples per prompt and policy in ``test``.
            val_samples_per_prompt: Samples per prompt and policy in validation (during ``fit`` and ``validate``).
            distinct_variant: Convention of distinct-n: 'dexperts' (DExperts/Quark: split on spaces, case kept,
                ÷ words) or 'ngram_ratio' (lower-cased words, ÷ n-grams); see ``metrics.DistinctN``.

        Raises:
            ValueError: samples per prompt below 1.
        """
        super().__init__()
        if samples_per_prompt < 1 or val_samples_per_prompt < 1:
            raise ValueError(f"samples per prompt must be ≥ 1, got test {samples_per_prompt}, val {val_samples_per_prompt}")
        self.samples_per_prompt = samples_per_prompt
        self.val_samples_per_prompt = val_samples_per_prompt
        self.distinct_variant = distinct_variant
        self.stage_metrics, self.seed, self.num_logged_samples, self.compared = nn.ModuleDict(), 0, 0, ()  # setup sets them
        self.samples, self.generations, self._base_samples = [], [], {}

    def setup(self, reward_names: Sequence[str], seed: int, num_logged_samples: int, compared: Sequence[str] = ()) -> None:
        """Build the metrics of each stage and policy (``metrics``; logged as ``<stage>/<name>/<policy>``) and start
        afresh (no kept samples, no cached base draws). ``IPAModule`` calls it with its reward's parts and settings.

        Args:
            reward_names: The reward's parts (``Reward.names``), each measured beside ``reward``.
            seed: Seed of the draws (``generate``).
            num_logged_samples: Validation samples kept in ``samples``.
            compared: Names of the training-free policies ``test`` measures too (``IPAModule(compare=...)``).
        """
        self.seed, self.num_logged_samples, self.compared = seed, num_logged_samples, tuple(compared)
        self.samples: list[dict[str, Any]] = []  # a few samples of the last validation, for SampleTable
        self.generations: list[dict[str, Any]] = []  # every sample of the test, with its scores, for TestResults
        self._base_samples: dict[tuple, list[str]] = {}  # the frozen base's draws are fixed: drawn once per batch
        self.stage_metrics = nn.ModuleDict({
            f"{stage}_{policy}": nn.ModuleDict(self.metrics(reward_names)) for stage in ("val", "test") for policy in self.policies(stage)
        })

    def policies(self, stage: Stage) -> tuple[str, ...]:
        """The policies ``stage`` measures, by name, as results tables show them: 'base', 'tailored', and in ``test`` each
        one compared."""
        return ("base", "tailored") + (self.compared if stage == "test" else ())

    def num_samples(self, stage: Stage) -> int:
        """Samples per prompt and policy in ``stage``."""
        return self.samples_per_prompt if stage == "test" else self.val_samples_per_prompt

    def metrics(self, reward_names: Sequence[str]) -> dict[str, Metric]:
        """Fresh metrics by log name (logged as ``<stage>/<name>/<policy>``)."""
        means = {name: MeanScore(name) for name in ("reward", *reward_names)}
        return {**means, "distinct_2": self.distinct(2), "corpus_distinct_2": CorpusDistinctN(2)}

    def distinct(self, n: int) -> DistinctN:
        """A distinct-n metric in this evaluation's ``distinct_variant``."""
        return DistinctN(n, variant=self.distinct_variant)

    def score(self, prompts: list[str], responses: list[str]) -> dict[str, Tensor]:
        """Per-sample scores [N] by name beside the reward's, for aligned prompt/response lists of N."""
        return {}

    def generate(self, policy: TailoredPolicy, prompts: list[str], batch_index: int, k: int = 1,
                 others: Mapping[str, TailoredPolicy] = {}) -> dict[str, list[str]]:
        """k tailored and k base-alone responses per prompt (each prompt's in a row), drawn with a seed fixed per batch,
        and k of each policy in ``others`` with the same seed from the same encoded prompts.

        The seed is ``seed`` + ``batch_index``, the batch's index in one process's order (``IPAModule.eval_batch_index``),
        so under DDP each batch gets the draws it gets in one process (the draws of a prompt depend on its batch: they
        are rows of one sampling call). The base's draws are made once per batch and kept. Policies that are the same
        distribution draw the same tokens (``TailoredPolicy.generate``).

        Args:
            policy: The tailored policy (and its base); it encodes the prompts for every policy.
            prompts: N prompt texts.
            batch_index: The batch's index in one process's order.
            k: Samples per prompt and policy.
            others: Further policies by name (training-free ones, ``LogitArithmetic.policy``).

        Returns:
            {"tailored": [N·k texts], "base": [N·k texts], <other>: [N·k texts], ...}, each prompt's k in a row.
        """
        encoded = policy.encode(prompts)
        generator = torch.Generator(encoded.ids.device).manual_seed(self.seed + batch_index)
        tailored = policy.generate(encoded, generator, samples_per_prompt=k)
        key = (*prompts, k)
        if key not in self._base_samples:
            generator.manual_seed(self.seed + batch_index)
            base = policy.generate(encoded, generator, samples_per_prompt=k, use_adapter=False)
            self._base_samples[key] = policy.decode(base.response_ids, base.response_mask)
        responses = {"tailored": policy.decode(tailored.response_ids, tailored.response_mask), "base": self._base_samples[key]}
        for name, other in others.items():
            generator.manual_seed(self.seed + batch_index)
            drawn = other.generate(encoded, generator, samples_per_prompt=k)
            responses[name] = other.decode(drawn.response_ids, drawn.response_mask)
        return responses

    def evaluate(self, policy: TailoredPolicy, score: Scorer, batch: PromptBatch, batch_index: int, stage: Stage,
                 others: Mapping[str, TailoredPolicy] = {}) -> dict[str, Metric]:
        """Generate for a batch with each policy, score the samples and update the stage's metrics; keep the first
        validation batch's samples (``samples``) and every test sample (``generations``).

        Args:
            policy: The tailored policy.
            score: The reward's scores of responses (``IPAModule.score``: the contract checked).
            batch: The prompts and their meta.
            batch_index: The batch's index in one process's order (for the seed).
            stage: 'val' or 'test'.
            others: The training-free policies compared in ``test``, by name (``policies``).

        Returns:
            The updated metrics by log name ``<stage>/<name>/<policy>``, for ``LightningModule.log``.
        """
        k = self.num_samples(stage)
        if set(others) != set(self.policies(stage)) - set(POLICIES):
            raise ValueError(f"{stage}: policies {sorted(others)} given, {list(self.compared if stage == 'test' else ())} set up (Evaluation.setup)")
        responses = self.generate(policy, batch["prompt"], batch_index, k, others)
        repeated = repeat_prompts(batch, k)
        samples = {
            name: Samples(batch["prompt"], texts, {**score(repeated, texts), **self.score(repeated["prompt"], texts)}, k, batch["meta"])
            for name, texts in responses.items()
        }
        logged = {}
        for name, policy_samples in samples.items():
            for metric_name, metric in self.stage_metrics[f"{stage}_{name}"].items():
                metric.update(policy_samples)
                logged[f"{stage}/{metric_name}/{name}"] = metric
        rows = {name: policy_samples.by_prompt() for name, policy_samples in samples.items()}  # [P] each
        if stage == "test":
            self.generations += [{"prompt": p, **{name: rows[name][i] for name in rows}} for i, p in enumerate(batch["prompt"])]
        if stage == "val" and batch_index == 0:  # the first sample of the first prompts
            self.samples = [
                {"prompt": p, **{name: rows[name][i]["responses"][0] for name in POLICIES},
                 **{f"reward_{name}": rows[name][i]["reward"][0] for name in POLICIES}}
                for i, p in enumerate(batch["prompt"][: self.num_logged_samples])
            ]
        return logged

    def predict(self, policy: TailoredPolicy, score: Scorer, batch: PromptBatch, batch_index: int) -> list[dict[str, Any]]:
        """One row per prompt of ``batch``: its tailored and base responses and their rewards (``PredictionWriter``
        writes them), drawn as ``generate`` draws them (``batch_index`` seeds them; ``score`` is ``IPAModule.score``)."""
        responses = self.generate(policy, batch["prompt"], batch_index)
        rewards = {name: score(batch, texts)["reward"].tolist() for name, texts in responses.items()}
        return [
            {"prompt": prompt, **{name: responses[name][i] for name in POLICIES}, **{f"reward_{name}": rewards[name][i] for name in POLICIES}}
            for i, prompt in enumerate(batch["prompt"])
        ]


PerplexityVariant = Literal["dexperts", "separate"]


class Perplexity(nn.Module):
    """Perplexity of each continuation given its prompt under a frozen evaluation LM (fluency).

    Reference (``variant="dexperts"``, the default): DExperts ``scripts/evaluation/evaluate_generations.py``
    ``conditional_perplexity`` (Quark's ``perplexity.py`` is the same): the prompt, and prompt + continuation as one
    string, are each tokenised with no BOS (``add_special_tokens=False``, what GPT-2's ``tokenizer.encode`` does), and
    perplexity = exp((NLL(full) − NLL(prompt)) / (len(full) − len(prompt))), NLL(x) summing −log p of x's tokens after
    its first. Tokenised together, the continuation's tokens are not always its own: "The quick br" + "own fox" is read
    as "The quick brown fox" (the difference above is then of two different readings, as in the reference). Where the
    full text has no token beyond the prompt's (an empty continuation, or "br" + "own" → "brown") the value is NaN
    (the reference divides by 0: NaN, or exp(−inf) = 0.0, which it keeps); a one-token prompt is scored with its NLL 0
    (the reference gets NaN there: HF's mean loss over no token); an empty prompt (the reference fails) is read after
    the tokenizer's BOS (GPT-2: ``<|endoftext|>``), or, without one, after the continuation's first token. Averages
    leave out perplexities ≥ 1e4 and NaN (``MeanScore(drop_at_or_above=1e4)``, as DExperts and Quark).

    ``variant="separate"``: this project's earlier convention: BOS (when the tokenizer has one), the prompt's tokens and
    the continuation's own tokens, tokenised apart; exp(mean NLL of the continuation's tokens). It scores exactly the
    tokens a policy would have sampled after the prompt.

    Texts are scored in batches of ``batch_size``, right-padded; padding changes no value. A text longer than the LM's
    context window is read in sliding windows of it (transformers' "Perplexity of fixed-length models", stride half the
    window; ``_nll_sums``), where the references would fail (GPT-2 XL reads at most 1,024 tokens).
    """

    def __init__(self, name_or_path: str, dtype: BaseDType = "auto", batch_size: int = 32, variant: PerplexityVariant = "dexperts"):
        """
        Args:
            name_or_path: Evaluation LM: hub name (GPT-2 XL, ``gpt2-xl``, in the literature), folder or ``.gguf``.
            dtype: Weights' dtype; 'auto': bfloat16 where the hardware runs it natively, else float32.
            batch_size: Texts per forward pass.
            variant: 'dexperts' (prompt and continuation tokenised together, no BOS: DExperts/Quark) or 'separate'
                (BOS, then prompt and continuation tokenised apart).
        """
        super().__init__()
        if variant not in ("dexperts", "separate"):
            raise ValueError(f"variant must be 'dexperts' or 'separate', got {variant!r}")
        path = resolve_pretrained(name_or_path)
        self.tokenizer = load_tokenizer(path)
        self.lm = load_causal_lm(path, dtype).requires_grad_(False).eval()
        self.batch_size = batch_size
        self.variant = variant
        self.window = max_positions(self.lm.config) or sys.maxsize  # the LM's context window in tokens
        self.convention = (
            "DExperts conditional_perplexity: prompt and prompt+continuation tokenised together, no BOS; "
            "exp((NLL(full) − NLL(prompt)) / (len(full) − len(prompt)))"
            if variant == "dexperts" else
            "BOS, then prompt and continuation tokenised apart; exp(mean NLL of the continuation's tokens)"
        )

    @torch.no_grad()
    def forward(self, prompts: list[str], continuations: list[str]) -> Tensor:
        """[N] perplexities (float32, on the LM's device) of ``continuations`` after ``prompts``."""
        encode = lambda texts: self.tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []  # noqa: E731
        bos = [] if self.tokenizer.bos_token_id is None else [self.tokenizer.bos_token_id]
        # each value is (Σ NLL of sequences[a][start_a:] − Σ NLL of sequences[b][start_b:]) / count
        sequences: list[tuple[list[int], int]] = []  # (token ids, first scored position ≥ 1)
        terms: list[tuple[int, Optional[int], int]] = []  # (sequence added, sequence subtracted or None, token count)
        if self.variant == "separate":
            for p, c in zip(encode(prompts), encode(continuations)):
                context = bos + p
                start = max(len(context), 1)
                sequences.append((context + c, start))
                terms.append((len(sequences) - 1, None, len(context) + len(c) - start))
        else:
            for prompt, p, full in zip(prompts, encode(prompts), encode([p + c for p, c in zip(prompts, continuations)])):
                if not prompt:  # nothing to condition on: the BOS, else the first token, is the context
                    p, full = (bos, bos + full) if bos else (full[:1], full)
                if full[: len(p)] == p:  # the prompt's tokens lead the full text's: NLL(full) − NLL(prompt) is the tail's
                    sequences.append((full, max(len(p), 1)))
                    terms.append((len(sequences) - 1, None, len(full) - max(len(p), 1)))
                else:  # a token straddles the boundary: both sums, as the reference takes them
                    sequences += [(full, 1), (p, 1)]
                    terms.append((len(sequences) - 2, len(sequences) - 1, len(full) - len(p)))
        sums = self._nll_sums(sequences)  # [S] float64
        values = [
            (sums[a] - (sums[b] if b is not None else 0.0)) / count if count > 0 else float("nan")
            for a, b, count in terms
        ]
        return torch.tensor(values, dtype=torch.float64).exp().float().to(self.lm.device)

    def _nll_sums(self, sequences: list[tuple[list[int], int]]) -> list[float]:
        """Σ −log p(token | the tokens before it) over the tokens of each sequence from its start on, in batches.

        A sequence longer than the LM's context window W (``max_positions``) is read in windows of W tokens that begin
        every W/2 tokens, each scoring its tokens past the previous window's end: transformers' "Perplexity of
        fixed-length models" (sliding window, stride W/2). Every token then has at least W/2 tokens of context, a
        prompt's tokens get the same windows in the prompt alone as in prompt + continuation (their NLLs cancel),
        and no position beyond the window is ever read.
        """
        pieces = [(window, owner) for owner, sequence in enumerate(sequences) for window in sliding_windows(*sequence, self.window)]
        piece_sums = self._nll_sums_within_window([window for window, _ in pieces])
        sums = [0.0] * len(sequences)
        for (_, owner), value in zip(pieces, piece_sums):
            sums[owner] += value
        return sums

    def _nll_sums_within_window(self, sequences: list[tuple[list[int], int]]) -> list[float]:
        """``_nll_sums`` of sequences that fit the context window."""
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))  # similar lengths together: less padding
        sums = [0.0] * len(sequences)
        for begin in range(0, len(order), self.batch_size):
            batch = [sequences[i] for i in order[begin : begin + self.batch_size]]
            width = max(len(ids) for ids, _ in batch)
            if width < 2:  # nothing to predict in any of them
                continue
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            scored = torch.zeros_like(ids, dtype=torch.bool)  # [B, L] tokens whose NLL counts
            for row, (tokens, start) in enumerate(batch):
                ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                mask[row, : len(tokens)] = 1
                scored[row, start : len(tokens)] = True
            ids, mask, scored = (x.to(self.lm.device) for x in (ids, mask, scored))
            logits = self.lm(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            nll = nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L-1]
            batch_sums = (nll.double() * scored[:, 1:]).sum(-1).tolist()
            for i, value in zip(order[begin : begin + self.batch_size], batch_sums):
                sums[i] = value
        return sums


def sliding_windows(tokens: list[int], start: int, window: int) -> list[tuple[list[int], int]]:
    """(tokens, first scored position) pieces that score ``tokens[start:]`` within ``window`` tokens each: the sequence
    itself if it fits, else transformers' sliding windows (stride ``window // 2``; see ``Perplexity._nll_sums``)."""
    if len(tokens) <= window:
        return [(tokens, start)]
    stride, pieces, scored_to = max(1, window // 2), [], 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        if end > max(start, scored_to):
            pieces.append((tokens[begin:end], max(start, scored_to) - begin))
        scored_to = end
        if end == len(tokens):
            break
    return pieces
