"""Nothing lost: checkpoints while training, exact resume (mid-pass, after a crash, a SIGKILL or a SIGTERM),
``--ckpt_path last`` naming one run, and the configuration given winning over a checkpoint's."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning import Trainer

from lightning_ipa import RemoteBase
from lightning_ipa.callbacks import completed_rollouts
from lightning_ipa.cli import CONF, DEFAULT_CONFIG, main
from lightning_ipa.data import EpochShuffle
from lightning_ipa.io import write_text_atomic
from tasks.quickstart import ConceptCoverage
from tests.test_cli import ROOT, scalars, tiny_args
from tests.test_remote import FaultyServer

# temperature 4: the peaked tiny model then writes varied responses, so rewards, advantages and updates are not 0;
# an adaptive KL coefficient, so its state must resume too; 8 training prompts in batches of 2: 4 rollouts per pass
VARIED = ["--model.sampling.temperature=4.0", "--model.algorithm.init_args.kl_target=0.5", "--model.algorithm.init_args.kl_horizon=20",
          "--data.init_args.train_size=8"]
ROLLOUT = 2 * 4  # samples per rollout: 2 prompts × 4 samples (tiny_args, conf/quickstart.yaml)


class RecordingCoverage(ConceptCoverage):
    """The quickstart's reward; appends the prompts of each rollout (a call with a rollout's number of samples) to
    the file ``record`` and, at the rollout numbered ``fail_at`` (1-based) in this process, raises, or sends this
    process the signal ``signal_name``."""

    def __init__(self, record: str = "", fail_at: int = 0, signal_name: str = "", **kwargs: Any):
        super().__init__(**kwargs)
        self.record, self.fail_at, self.signal_name, self.calls = record, fail_at, signal_name, 0

    def __call__(self, prompts, responses, meta):
        if len(responses) == ROLLOUT:
            self.calls += 1
            with open(self.record, "a") as f:
                f.write(json.dumps(prompts[::4]) + "\n")
            if self.calls == self.fail_at and self.signal_name:
                os.kill(os.getpid(), getattr(signal, self.signal_name))  # SIGTERM: handled at the next rollout boundary
            elif self.calls == self.fail_at:
                raise RuntimeError(f"reward service down at rollout {self.calls}")
        return super().__call__(prompts, responses, meta)


def recording(record: Path, fail_at: int = 0, signal_name: str = "") -> list[str]:
    return ["--model.reward=tests.test_checkpoints.RecordingCoverage", f"--model.reward.record={record}",
            f"--model.reward.fail_at={fail_at}", f"--model.reward.signal_name={signal_name}"]


def recorded(record: Path) -> list[list[str]]:
    """The prompts of each rollout recorded in ``record`` (and the file emptied)."""
    rollouts = [json.loads(line) for line in record.read_text().splitlines()]
    record.unlink()
    return rollouts


def fit(model: str, save_dir: Path, steps: int, *extra: str):
    return main(["fit", *tiny_args(model, save_dir, steps, *VARIED, *extra)])


def assert_same_adapter(a, b) -> None:
    assert a.policy.adapter.head.projection.weight.abs().sum() > 0  # trained: the head started at 0
    for (name, x), y in zip(a.policy.adapter.named_parameters(), b.policy.adapter.parameters()):
        assert torch.equal(x, y), name
    assert torch.equal(a.algorithm.kl_coef, b.algorithm.kl_coef) and a.algorithm.kl_coef != 0.05  # the KL coefficient adapted


def last_step(run: Path) -> int:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]


def test_resume_mid_pass_equals_the_straight_run(tiny_llama, tmp_path):
    """fit 4 rollouts straight vs 2, then --ckpt_path last to 4: the second pass's half is not replayed."""
    record = tmp_path / "prompts.jsonl"
    straight = fit(tiny_llama, tmp_path / "a", 4, *recording(record)).model
    straight_prompts = recorded(record)
    assert len({tuple(p) for p in straight_prompts}) == 4  # one pass over the 8 prompts: 4 different batches
    fit(tiny_llama, tmp_path / "b", 2, *recording(record))
    first = recorded(record)
    resumed = fit(tiny_llama, tmp_path / "b", 4, *recording(record), "--ckpt_path", "last")
    assert first + recorded(record) == straight_prompts  # the same prompts in the same order
    assert resumed.trainer.global_step == 4 and resumed.trainer.logger.version == 0
    assert_same_adapter(straight, resumed.model)


def test_a_reward_raising_at_rollout_5_leaves_rollout_4s_checkpoint_which_resumes(tiny_llama, tmp_path):
    straight = fit(tiny_llama, tmp_path / "a", 6, *recording(tmp_path / "prompts.jsonl")).model
    with pytest.raises(RuntimeError, match="reward service down at rollout 5"):
        fit(tiny_llama, tmp_path / "b", 6, *recording(tmp_path / "prompts.jsonl", fail_at=5))  # validations (and checkpoints) after rollouts 2 and 4
    run = tmp_path / "b" / "quickstart" / "version_0"
    assert last_step(run) == 4  # rollout 5 was cut short: not a state to resume from
    resumed = fit(tiny_llama, tmp_path / "b", 6, *recording(tmp_path / "prompts.jsonl"), "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6
    assert_same_adapter(straight, resumed.model)
    assert scalars(run)["train/reward"] == scalars(tmp_path / "a" / "quickstart" / "version_0")["train/reward"]


def test_checkpoints_every_n_rollouts_without_validation(tiny_llama, tmp_path):
    every = ["--trainer.callbacks.every_n_rollouts=3", "--trainer.val_check_interval=100", "--trainer.limit_val_batches=0"]
    with pytest.raises(RuntimeError, match="rollout 5"):
        fit(tiny_llama, tmp_path, 8, *recording(tmp_path / "prompts.jsonl", fail_at=5), *every)
    assert last_step(tmp_path / "quickstart" / "version_0") == 3


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "lightning_ipa", "fit", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


@pytest.mark.parametrize("signal_name, saved_at", [("SIGKILL", 4), ("SIGTERM", 5)])
def test_a_killed_process_resumes_from_its_last_checkpoint(tiny_llama, tmp_path, signal_name, saved_at):
    """SIGKILL at rollout 5: last.ckpt is the validation's after rollout 4. SIGTERM (pre-emption) at rollout 5: Lightning
    stops at the end of that rollout and RolloutCheckpoint saves it. Either way the resumed run equals the straight one."""
    straight = fit(tiny_llama, tmp_path / "a", 6, *recording(tmp_path / "prompts.jsonl")).model
    out = run_cli(*tiny_args(tiny_llama, tmp_path / "b", 6, *VARIED, *recording(tmp_path / "prompts.jsonl", fail_at=5, signal_name=signal_name)))
    run = tmp_path / "b" / "quickstart" / "version_0"
    if signal_name == "SIGKILL":
        assert out.returncode == -signal.SIGKILL
    else:
        assert out.returncode == 128 + signal.SIGTERM, (out.stdout + out.stderr)[-3000:]  # 143: not finished
        assert "SIGTERMException: saved" in out.stdout + out.stderr
    assert last_step(run) == saved_at
    resumed = fit(tiny_llama, tmp_path / "b", 6, *recording(tmp_path / "prompts.jsonl"), "--ckpt_path", "last")
    assert resumed.trainer.global_step == 6
    assert_same_adapter(straight, resumed.model)


def test_ckpt_path_last_never_picks_another_run(tiny_llama, tmp_path):
    fit(tiny_llama, tmp_path, 2)
    finished = tmp_path / "quickstart" / "version_0"
    config = (finished / "config.yaml").read_bytes()
    with pytest.raises(RuntimeError):  # a run that dies before its first checkpoint (version_1)
        fit(tiny_llama, tmp_path, 4, *recording(tmp_path / "prompts.jsonl", fail_at=1))
    with pytest.raises(SystemExit, match=r"version_1 has no checkpoints/last.ckpt .*runs with a checkpoint:\n  .*version_0/checkpoints/last.ckpt"):
        fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last")
    assert (finished / "config.yaml").read_bytes() == config and last_step(finished) == 2  # untouched
    resumed = fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last", "--trainer.logger.init_args.version=0")  # named: resumed
    assert resumed.trainer.global_step == 4 and resumed.trainer.logger.version == 0
    assert (finished / "config.yaml").read_bytes() == config  # the run's own configuration is kept ...
    assert "max_rollouts: 4" in (finished / "config.resume1.yaml").read_text()  # ... and the resume's is beside it
    with pytest.raises(SystemExit, match="at rollout 4, and --model.max_rollouts is 4: nothing to train"):
        fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last", "--trainer.logger.init_args.version=0")


def test_default_root_dir_places_the_run(tiny_llama, tmp_path):
    cli = main(["fit", *tiny_args(tiny_llama, tmp_path / "ignored", 2), f"--trainer.default_root_dir={tmp_path / 'here'}"])
    assert Path(cli.trainer.log_dir) == tmp_path / "here" / "quickstart" / "version_0"
    assert (tmp_path / "here" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "ignored").exists()


def test_the_configuration_given_wins_over_the_checkpoints(tiny_llama, tmp_path):
    fit(tiny_llama, tmp_path, 2)
    last = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    for ckpt in (str(last), "last"):
        cli = main(["validate", *tiny_args(tiny_llama, tmp_path, 2, *VARIED, "--model.sampling.top_p=0.5"), "--ckpt_path", ckpt])
        assert cli.model.policy.sampling.top_p == 0.5 and cli.model.policy.sampling.temperature == 4.0
    with FaultyServer(tiny_llama, []) as server:  # the base given: the remote one, not the checkpoint's local one
        api = ["--config", str(CONF / "blackbox" / "remote_base.yaml"), f"--model.base.init_args.base_url={server.url}",
               f"--model.base.init_args.tokenizer={tiny_llama}", "--model.base.init_args.chat_template=false", "--model.base.init_args.top_logprobs=8",
               f"--model.adapter.name_or_path={tiny_llama}"]
        cli = main(["validate", "--config", str(DEFAULT_CONFIG), *tiny_args(tiny_llama, tmp_path, 2), *api, "--ckpt_path", str(last)])
        assert isinstance(cli.model.policy.base, RemoteBase) and server.requests > 0


@pytest.mark.parametrize("change, message", [
    ("--model.adapter.head=zeros", r"configured but not in the checkpoint: policy.adapter.head.weight\n"
                                   r"  in the checkpoint but not configured: policy.adapter.head.projection.weight"),
    ("--model.adapter.num_layers=1", r"in the checkpoint but not configured: policy.adapter.body.layers.1"),
    ("--model.algorithm=lightning_ipa.algorithms.PPO", r"configured but not in the checkpoint: algorithm.value_head"),
])
def test_a_checkpoint_that_does_not_fit_the_configured_adapter_is_refused(tiny_llama, tmp_path, change, message):
    fit(tiny_llama, tmp_path, 2)
    run = tmp_path / "quickstart" / "version_0"
    for ckpt in (str(run / "checkpoints" / "last.ckpt"), "last"):
        with pytest.raises(ValueError, match=message + r"(.|\n)*pass --config .*version_0/config.yaml"):
            main(["validate", *tiny_args(tiny_llama, tmp_path, 2), change, "--ckpt_path", ckpt])


def test_two_processes_resume_mid_pass_as_they_run_straight(tiny_llama, tmp_path):
    """DDP (2 CPU processes): each rank's share of the pass continues where it stopped (EpochShuffle deals it)."""
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.init_args.train_size=16"]  # 8 prompts a rank: 4 rollouts a pass

    def weights(save_dir: Path) -> dict[str, torch.Tensor]:
        return torch.load(save_dir / "quickstart" / "version_0" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    for save_dir, steps, resume in [(tmp_path / "a", 4, []), (tmp_path / "b", 2, []), (tmp_path / "b", 4, ["--ckpt_path", "last"])]:
        out = run_cli(*tiny_args(tiny_llama, save_dir, steps, *VARIED, *ddp), *resume)
        assert out.returncode == 0, out.stderr[-3000:]
    straight, resumed = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert straight.keys() == resumed.keys() and straight["policy.adapter.head.projection.weight"].abs().sum() > 0
    assert all(torch.equal(straight[k], resumed[k]) for k in straight if torch.is_tensor(straight[k]))


def test_fit_ends_with_a_checkpoint_of_its_last_rollout(tiny_llama, tmp_path):
    fit(tiny_llama, tmp_path, 3)  # validations (and checkpoints) after rollouts 2; the end at 3
    assert last_step(tmp_path / "quickstart" / "version_0") == 3


def test_a_moved_run_resumes_into_its_own_last_ckpt(tiny_llama, tmp_path):
    fit(tiny_llama, tmp_path / "a", 2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")  # the checkpoint remembers a's folder
    for steps in (3, 4):
        fit(tiny_llama, tmp_path / "b", steps, "--ckpt_path", "last")
        run = tmp_path / "b" / "quickstart" / "version_0"
        assert last_step(run) == steps and sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert last_step(tmp_path / "a" / "quickstart" / "version_0") == 2


def test_a_resume_says_which_settings_are_used_and_which_continue(tiny_llama, tmp_path, capsys):
    fit(tiny_llama, tmp_path, 2)
    fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last", "--model.lr=0.01", "--model.sampling.top_p=0.5", "--data.init_args.val_size=4")
    out = capsys.readouterr().out
    used, _, continued = out.partition("training state, continued from the checkpoint")
    assert "model.sampling.top_p: 0.5 (checkpoint: 0.9)" in used and "data.val_size: 4 (checkpoint: 6)" in used
    assert "model.lr: 0.01 (checkpoint: 0.0002)" in continued  # conf/quickstart.yaml's lr


def test_a_changed_order_of_prompts_starts_a_new_pass_and_says_so():
    sampler = EpochShuffle(8, batch_size=2, seed=0)
    state = {"passes": 1, "dealt": 4, **sampler.settings()}  # half-way through the first pass
    sampler.load_state_dict(state)
    assert list(sampler) == list(EpochShuffle(8, batch_size=2, seed=0))[4:]
    bigger = EpochShuffle(12, batch_size=2, seed=0)
    with pytest.warns(UserWarning, match=r"changed since the checkpoint \(size 8 → 12\).*goes on with a new pass"):
        bigger.load_state_dict(state)
    second = EpochShuffle(12, batch_size=2, seed=0)
    list(second)
    assert list(bigger) == list(second)  # the second pass, whole


def test_a_refused_start_leaves_no_run_behind(tiny_llama, tmp_path):
    fit(tiny_llama, tmp_path, 2)
    with pytest.raises(ValueError, match="minibatch_size=3 does not divide"):
        fit(tiny_llama, tmp_path, 4, "--model.algorithm.init_args.minibatch_size=3")
    with pytest.raises(ValueError, match="does not fit the configured model"):
        fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last", "--model.adapter.num_layers=1")
    with pytest.raises(SystemExit, match="--ckpt_path .*typo.ckpt: no such file"):
        fit(tiny_llama, tmp_path, 4, "--ckpt_path", str(tmp_path / "typo.ckpt"))
    runs = tmp_path / "quickstart"  # (Lightning creates a logger's folder and events file before any check can run)
    assert [p.parent.name for p in runs.glob("*/config*.yaml")] == ["version_0"] and not list(runs.glob("*/checkpoints/*.partial"))
    with pytest.raises(SystemExit, match=r"version_7 has no checkpoints/last.ckpt \(no such run\)"):
        fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last", "--trainer.logger.init_args.version=7")
    with pytest.raises(SystemExit, match="version_0 already holds a run: resume it with --ckpt_path last"):
        fit(tiny_llama, tmp_path, 4, "--trainer.logger.init_args.version=0")  # a fresh run into it would mix the two
    assert fit(tiny_llama, tmp_path, 4, "--ckpt_path", "last").trainer.global_step == 4


def test_a_csv_logged_run_resumes_in_a_new_folder_keeping_its_metrics(tiny_llama, tmp_path):
    csv = ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}",
           "--trainer.logger.init_args.name=quickstart", "--trainer.callbacks=[]", "--trainer.callbacks+=lightning_ipa.callbacks.RolloutCheckpoint"]
    fit(tiny_llama, tmp_path, 2, *csv)
    first = (tmp_path / "quickstart" / "version_0" / "metrics.csv").read_text()
    resumed = fit(tiny_llama, tmp_path, 4, *csv, "--ckpt_path", "last")
    assert resumed.trainer.global_step == 4 and Path(resumed.trainer.log_dir).name == "version_1"
    assert (tmp_path / "quickstart" / "version_0" / "metrics.csv").read_text() == first


def test_without_a_logger_last_is_the_default_root_dirs(tiny_llama, tmp_path):
    alone = ["--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks=[]",
             "--trainer.callbacks+=lightning_ipa.callbacks.RolloutCheckpoint"]
    with pytest.raises(SystemExit, match="--ckpt_path last: no .*checkpoints/last.ckpt"):
        fit(tiny_llama, tmp_path, 2, *alone, "--ckpt_path", "last")
    fit(tiny_llama, tmp_path, 2, *alone)
    with pytest.raises(SystemExit, match="already holds a run"):
        fit(tiny_llama, tmp_path, 2, *alone)
    with pytest.raises(SystemExit, match="at rollout 2, and --model.max_rollouts is 2: nothing to train"):
        fit(tiny_llama, tmp_path, 2, *alone, "--ckpt_path", "last")
    assert fit(tiny_llama, tmp_path, 4, *alone, "--ckpt_path", "last").trainer.global_step == 4
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "config.resume1.yaml").is_file()


def test_checkpoints_are_written_beside_and_renamed_into_place(tiny_llama, tmp_path, monkeypatch):
    written = []
    save = Trainer.save_checkpoint
    monkeypatch.setattr(Trainer, "save_checkpoint", lambda self, path, *a, **k: (written.append(str(path)), save(self, path, *a, **k))[1])
    fit(tiny_llama, tmp_path, 2)
    folder = tmp_path / "quickstart" / "version_0" / "checkpoints"
    assert written and all(p == str(folder / "last.ckpt.partial") for p in written)  # then renamed: atomic on its filesystem
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


def test_result_files_are_readable_by_others_as_the_umask_allows(tmp_path):
    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "results.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "results.json").stat().st_mode & 0o777 == 0o644


def test_a_checkpoint_from_before_kl_loss_coef_resumes(tiny_llama, tmp_path):
    """Checkpoints up to c8754c5 hold ``algorithm.kl_coef`` but not ``algorithm.kl_loss_coef``: they resume (with the
    configured ``kl_loss_coef``), and a resume that changes it lists it as training state continued from the checkpoint."""
    fit(tiny_llama, tmp_path, 2)
    path = tmp_path / "quickstart" / "version_0" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    adapted = checkpoint["state_dict"]["algorithm.kl_coef"]
    del checkpoint["state_dict"]["algorithm.kl_loss_coef"]  # as the older code saved it
    torch.save(checkpoint, path)
    resumed = fit(tiny_llama, tmp_path, 3, "--ckpt_path", "last")
    assert completed_rollouts(resumed.trainer) == 3 and resumed.model.algorithm.kl_coef != adapted  # resumed, and adapting on
    assert resumed.model.algorithm.kl_loss_coef == 0.0  # the quickstart's (RLOO's default)
