"""The reward contract (``lightning_ipa.rewards.Reward``), checked on every call of a reward; and the loss guard.

A broken reward output stops the run before any update with one error that names the reward's class, the score, the
sample with its prompt and response, the bad value and the fix. A non-finite loss stops it before ``optimizer.step()``.
"""

import math
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_ipa import LocalBase
from lightning_ipa.cli import DEFAULT_CONFIG, main
from lightning_ipa.module import IPAModule
from lightning_ipa.rewards import ComposedReward, PerplexityFluency, Reward
from test_cli import ROOT, scalars, tiny_args

PROMPTS = ["Use dog, ball.", "Use cat, sofa.", "Use sun, sea."]
RESPONSES = ["The dog fetches the ball.", "", "The sun sets over the sea."]
NAN, INF = float("nan"), float("inf")
VARIED = ["--model.sampling.temperature=4.0"]  # the peaked tiny model then writes varied responses: rewards differ, updates are not 0


class Returns(Reward):
    """Returns a fixed output, whatever it is: a stand-in for a broken reward."""

    def __init__(self, output, names: tuple[str, ...] = ()):
        self.output = output
        self.names = names

    def __call__(self, prompts, responses, meta):
        return self.output


class NaNAt(Reward):
    """reward = number of words, but NaN for the second sample of its ``at``-th call (counting from 1)."""

    def __init__(self, at: int = 2):
        self.at = at
        self.calls = 0

    def __call__(self, prompts, responses, meta):
        self.calls += 1
        values = [float(len(r.split())) for r in responses]
        if self.calls == self.at:
            values[1] = math.nan
        return {"reward": values}


class AdapterSnapshots(Callback):
    """The adapter's parameters at the start of each rollout."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.states.append({name: p.detach().clone() for name, p in pl_module.policy.adapter.named_parameters()})


@pytest.fixture(scope="module")
def module(tiny_llama):
    return IPAModule(LocalBase(tiny_llama, dtype="float32"), Returns({"reward": [0.0] * 3}))


def score(module, output, names=(), prompts=PROMPTS, responses=RESPONSES):
    module.reward = Returns(output, names)
    return module.score({"prompt": list(prompts), "meta": [{}] * len(prompts)}, list(responses))


def contract_error(module, output, names=(), **kwargs) -> str:
    """The message of the contract error that scoring ``output`` raises (a ValueError or a TypeError)."""
    with pytest.raises((ValueError, TypeError)) as error:
        score(module, output, names, **kwargs)
    assert type(error.value).__name__ == "RewardContractError"
    message = str(error.value)
    assert f"{__name__}.Returns" in message  # the reward's qualified class name
    assert "Reward" in message and "Fix" in message  # where the contract is written, and what to do
    return message


def names_sample(message: str, index: int) -> None:
    assert f"sample {index}" in message
    assert repr(PROMPTS[index]) in message and repr(RESPONSES[index]) in message


# ---- each violation, with its message ----

@pytest.mark.parametrize(
    "values, index, shown",
    [
        ([0.1, NAN, 0.3], 1, "nan"),  # a list
        (torch.tensor([0.1, 0.2, INF]), 2, "inf"),  # a tensor
        (np.array([-INF, 0.2, 0.3]), 0, "-inf"),  # an array
        ((0.1, 0.2, 1e39), 2, "1e+39"),  # finite in float64, inf in float32 (what training uses)
    ],
)
def test_non_finite_reward_names_the_sample(module, values, index, shown):
    message = contract_error(module, {"reward": values})
    assert "'reward'" in message and shown in message and "finite" in message
    names_sample(message, index)


def test_non_finite_part_names_the_part(module):
    message = contract_error(module, {"reward": [0.1, 0.2, 0.3], "part": torch.tensor([0.1, NAN, NAN])}, names=("part",))
    assert "'part'" in message and "nan" in message and "2 of 3" in message  # all of them counted, the first shown
    names_sample(message, 1)


def test_one_value_too_few_names_the_first_sample_without_one(module):
    message = contract_error(module, {"reward": [0.1, 0.2]})
    assert "'reward'" in message and "2 values for 3 responses" in message
    names_sample(message, 2)


def test_too_many_values(module):
    message = contract_error(module, {"reward": torch.tensor([0.1, 0.2, 0.3, 0.4])})
    assert "'reward'" in message and "4 values for 3 responses" in message and "0.4" in message


def test_missing_reward_key(module):
    message = contract_error(module, {"score": [0.1, 0.2, 0.3]})
    assert "'reward'" in message and "'score'" in message  # what is missing, and what it returned


def test_not_a_mapping(module):
    message = contract_error(module, torch.tensor([0.1, 0.2, 0.3]))
    assert "mapping" in message and "Tensor" in message


@pytest.mark.parametrize("value, shown", [("0.5", "str"), (None, "None"), (0.5, "float"), ({"a": 1.0}, "dict")])
def test_a_value_that_is_not_one_number_per_sample(module, value, shown):
    message = contract_error(module, {"reward": value})
    assert "'reward'" in message and shown in message and "one number per response" in message


def test_an_element_that_is_not_a_number_names_its_sample(module):
    message = contract_error(module, {"reward": [0.1, "high", 0.3]})
    assert "'reward'" in message and "'high'" in message and "not a real number" in message
    names_sample(message, 1)
    message = contract_error(module, {"reward": [0.1, 0.2, None]})
    assert "None" in message
    names_sample(message, 2)


@pytest.mark.parametrize("value", [torch.zeros(3, 1), np.zeros((3, 2)), [[0.1], [0.2], [0.3]], torch.tensor(0.5)])
def test_a_value_of_the_wrong_shape(module, value):
    message = contract_error(module, {"reward": value})
    assert "'reward'" in message and "one number per response" in message
    if isinstance(value, list):
        names_sample(message, 0)  # its first element is not a number
    else:
        assert "shape" in message


def test_complex_values_are_refused(module):
    message = contract_error(module, {"reward": torch.tensor([1 + 1j, 0j, 0j])})
    assert "complex" in message


def test_a_declared_part_missing_and_an_undeclared_extra_score(module):
    message = contract_error(module, {"reward": [0.1, 0.2, 0.3]}, names=("coverage",))
    assert "'coverage'" in message and "names" in message
    message = contract_error(module, {"reward": [0.1, 0.2, 0.3], "extra": [1, 2, 3]}, names=())
    assert "'extra'" in message and "names" in message


def test_long_texts_are_shortened(module):
    prompts, responses = ["Use " + "dog " * 500, "p", "q"], ["x", "word " * 1000, "z"]
    message = contract_error(module, {"reward": [0.1, NAN, 0.3]}, prompts=prompts, responses=responses)
    assert "sample 1" in message and "word word" in message and len(message) < 2000


def test_valid_outputs_of_every_kind_are_accepted_as_float32(module):
    kinds = [[1, 2, 3], (0.5, True, np.float32(2)), torch.tensor([1, 2, 3]), np.array([0.1, 0.2, 0.3]), torch.arange(3.0).double()]
    for value in kinds:
        scores = score(module, {"reward": value, "part": [0.0, -1.0, 1e30]}, names=("part",))
        assert set(scores) == {"reward", "part"}
        assert all(s.dtype == torch.float32 and s.shape == (3,) for s in scores.values())
    assert score(module, {"reward": []}, prompts=[], responses=[])["reward"].shape == (0,)  # an empty batch


# ---- composed rewards: the inner reward is named ----

def test_composed_reward_names_the_inner_reward_and_its_name(module):
    composed = ComposedReward({"fine": Returns({"reward": [0.1, 0.2, 0.3]}), "broken": Returns({"reward": [0.1, NAN, 0.3]})})
    module.reward = composed
    with pytest.raises(ValueError) as error:
        module.score({"prompt": PROMPTS, "meta": [{}] * 3}, RESPONSES)
    message = str(error.value)
    assert f"{__name__}.Returns" in message and "'broken'" in message and "lightning_ipa.rewards.ComposedReward" in message
    names_sample(message, 1)


def test_composed_product_of_a_negative_part_is_caught(module):
    parts = {"a": Returns({"reward": [0.5, -0.5, 0.5]}), "b": Returns({"reward": [1.0, 1.0, 1.0]})}
    composed = ComposedReward(parts, "product", {"a": 0.5})  # (-0.5) ** 0.5 is NaN
    module.reward = composed
    with pytest.raises(ValueError) as error:
        module.score({"prompt": PROMPTS, "meta": [{}] * 3}, RESPONSES)
    message = str(error.value)
    assert "lightning_ipa.rewards.ComposedReward" in message and "nan" in message and "≥ 0" in message
    names_sample(message, 1)


# ---- rewards that could produce an undefined part are inside the contract ----

def test_perplexity_fluency_defines_the_perplexity_of_a_response_with_nothing_to_score(module, tiny_llama):
    fluency = PerplexityFluency(tiny_llama, max_perplexity=100.0, dtype="float32")
    module.reward = fluency
    scores = module.score({"prompt": PROMPTS, "meta": [{}] * 3}, RESPONSES)  # RESPONSES[1] is empty
    assert scores["perplexity"][1] == 100.0 and scores["reward"][1] == 0.0  # at max_perplexity: fluency 0
    assert torch.isfinite(scores["perplexity"]).all()
    defined = fluency.perplexity(PROMPTS, RESPONSES)
    assert torch.allclose(scores["perplexity"][[0, 2]], defined[[0, 2]])


# ---- end to end through the CLI ----

def test_fit_stops_at_a_nan_reward_before_any_update_from_it(tiny_llama, tmp_path):
    reward = [f"--model.reward={__name__}.NaNAt", "--model.reward.at=2"]
    cli = main(["--config", str(DEFAULT_CONFIG), *tiny_args(tiny_llama, tmp_path, 4), *VARIED, *reward], run=False)
    snapshots = AdapterSnapshots()
    cli.trainer.callbacks.append(snapshots)
    with pytest.raises(ValueError) as error:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    message = str(error.value)
    assert type(error.value).__name__ == "RewardContractError"
    assert f"{__name__}.NaNAt" in message and "'reward'" in message and "sample 1" in message and "nan" in message
    assert "train" in message and "global step 1" in message
    assert cli.model.reward.calls == 2
    assert cli.trainer.global_step == 1  # the first rollout's update only
    assert len(snapshots.states) == 2
    for name, p in cli.model.policy.adapter.named_parameters():  # nothing learnt from the bad rollout
        assert torch.isfinite(p).all() and torch.equal(p, snapshots.states[1][name]), name
    assert any(not torch.equal(snapshots.states[0][n], snapshots.states[1][n]) for n in snapshots.states[0])  # the first did train


def test_validation_with_a_nan_reward_stops_naming_the_stage(tiny_llama, tmp_path):
    with pytest.raises(ValueError, match=r"(?s)NaNAt.*validat"):
        # 2 rollouts, then validation
        main(["fit", *tiny_args(tiny_llama, tmp_path, 2), f"--model.reward={__name__}.NaNAt", "--model.reward.at=3"])


def test_predict_with_a_nan_reward_stops(tiny_llama, tmp_path):
    with pytest.raises(ValueError) as error:
        main(["predict", *tiny_args(tiny_llama, tmp_path), f"--model.reward={__name__}.NaNAt", "--model.reward.at=1"])
    assert type(error.value).__name__ == "RewardContractError"
    assert f"{__name__}.NaNAt" in str(error.value) and "sample 1" in str(error.value) and "predict" in str(error.value)


def test_fit_with_a_composed_reward_names_the_broken_part(tiny_llama, tmp_path):
    config = tmp_path / "composed.yaml"
    config.write_text(
        "model:\n  reward:\n    class_path: lightning_ipa.rewards.ComposedReward\n    init_args:\n      rewards:\n"
        f"        coverage:\n          class_path: tasks.quickstart.ConceptCoverage\n"
        f"        broken:\n          class_path: {__name__}.NaNAt\n          init_args:\n            at: 1\n"
    )
    with pytest.raises(ValueError) as error:
        main(["fit", "--config", str(ROOT / "conf" / "quickstart.yaml"), "--config", str(config), *tiny_args(tiny_llama, tmp_path, 2)])
    message = str(error.value)
    assert f"{__name__}.NaNAt" in message and "'broken'" in message and "ComposedReward" in message and "sample 1" in message


def test_a_non_finite_loss_stops_before_the_optimizer_step(tiny_llama, tmp_path):
    cli = main(["--config", str(DEFAULT_CONFIG), *tiny_args(tiny_llama, tmp_path, 4), *VARIED], run=False)
    snapshots = AdapterSnapshots()
    cli.trainer.callbacks.append(snapshots)
    algorithm, loss = cli.model.algorithm, cli.model.algorithm.loss
    calls = []

    def nan_on_second_rollout(*args, **kwargs):
        calls.append(1)
        output = loss(*args, **kwargs)
        return output._replace(loss=output.loss * NAN) if len(calls) == 2 else output

    algorithm.loss = nan_on_second_rollout
    with pytest.raises(FloatingPointError) as error:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    message = str(error.value)
    assert "loss" in message and "nan" in message and "global step 1" in message and "rollout" in message
    assert "policy" in message  # the loss's stats, by name
    assert cli.trainer.global_step == 1
    for name, p in cli.model.policy.adapter.named_parameters():
        assert torch.isfinite(p).all() and torch.equal(p, snapshots.states[1][name]), name


# ---- the README's example reward, exactly as printed ----

def readme_reward_example() -> tuple[str, str, list[str]]:
    """(file name, code, arguments after ``fit``) of the README's "Write your own reward" section."""
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Write your own reward\n(.*?)(?=^## )", readme, re.M | re.S)
    assert section, "README.md has no '## Write your own reward' section"
    code = re.search(r"```python\n(.*?)```", section.group(1), re.S).group(1)
    file_name = re.match(r"# (\w+\.py)\n", code).group(1)  # the block's first line names its file
    command = next(line for line in re.search(r"```bash\n(.*?)```", section.group(1), re.S).group(1).splitlines() if " fit " in line)
    words = shlex.split(command.split("#")[0])
    return file_name, code, words[words.index("fit") + 1 :]


def test_readme_reward_example_trains(tiny_llama, tmp_path, monkeypatch):
    file_name, code, args = readme_reward_example()
    assert any(a.startswith("--model.reward=") and a.removeprefix("--model.reward=").startswith(Path(file_name).stem + ".") for a in args)
    (tmp_path / file_name).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = main(["fit", *tiny_args(tiny_llama, tmp_path / "runs", 2), *args])
    assert type(cli.model.reward).__module__ == Path(file_name).stem
    for arg in args:  # its init args reached it
        if match := re.fullmatch(r"--model\.reward\.(?:init_args\.)?(\w+)=(.*)", arg):
            assert str(getattr(cli.model.reward, match.group(1))) == match.group(2), arg
    assert cli.trainer.global_step == 2
    logged = scalars(tmp_path / "runs" / "quickstart" / "version_0")
    assert "train/reward" in logged and len(logged["train/reward"]) == 2 and all(math.isfinite(v) for v in logged["train/reward"])
    for name in cli.model.reward.names:  # its parts are logged beside it, in training and validation
        assert f"train/{name}" in logged and f"val/{name}/tailored" in logged
