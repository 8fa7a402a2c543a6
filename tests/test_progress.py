"""Progress that tells the truth: the training length in rollouts, a progress bar and a TensorBoard step axis that
count rollouts, the end-of-fit summary, ``fit --help`` showing the defaults ``fit`` uses, and a plain run without
warnings a user can do nothing about."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ipa.callbacks import RolloutProgressBar
from lightning_ipa.cli import DEFAULT_CONFIG, main
from tests.test_cli import scalars, tiny_args

ROOT = Path(__file__).resolve().parents[1]
# 4 optimizer steps per rollout (2 epochs × 2 minibatches of 4 samples), so that optimizer steps and rollouts differ
FOUR_UPDATES = ["--model.algorithm.init_args.epochs=2", "--model.algorithm.init_args.minibatch_size=4"]


def event_steps(run: Path) -> dict[str, list[int]]:
    """Each TensorBoard tag (scalars and the sample tables' text) with the steps it was written at."""
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    steps = {tag: sorted(e.step for e in events.Scalars(tag)) for tag in events.Tags()["scalars"]}
    steps.update({tag: sorted(e.step for e in events.Tensors(tag)) for tag in events.Tags()["tensors"]})
    return steps


def test_max_rollouts_counts_rollouts_whatever_the_updates_and_every_series_uses_that_axis(tiny_llama, tmp_path):
    cli = main(["fit", *tiny_args(tiny_llama, tmp_path, 4, *FOUR_UPDATES)])  # model.max_rollouts=4, validation every 2
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.completed == 4 and cli.trainer.global_step == 16
    steps = event_steps(tmp_path / "quickstart" / "version_0")
    training = [tag for tag in steps if tag.startswith(("train/", "loss/"))]
    evaluation = [tag for tag in steps if tag.startswith("val/")]
    assert {"train/reward", "train/kl", "train/lr", "train/head_lr", "loss/policy"} <= set(training)
    assert "val/samples/text_summary" in evaluation and "val/coverage/tailored" in evaluation
    assert {tag: steps[tag] for tag in training} == {tag: [1, 2, 3, 4] for tag in training}  # rollout r at step r
    assert {tag: steps[tag] for tag in evaluation} == {tag: [2, 4] for tag in evaluation}  # after rollouts 2 and 4
    assert set(steps) == set(training) | set(evaluation)  # no series on another axis (epoch, optimizer steps)


def test_the_progress_bar_counts_rollouts_and_a_resumed_run_starts_where_it_was(tiny_llama, tmp_path, monkeypatch):
    seen = []  # (completed, total) of the bar's task at each rollout's end
    original = RolloutProgressBar.on_train_batch_end

    def spy(self, trainer, *args):
        original(self, trainer, *args)
        task = self.progress.tasks[self.train_progress_bar_id]
        seen.append((task.description.strip(), task.completed, task.total))

    monkeypatch.setattr(RolloutProgressBar, "on_train_batch_end", spy)
    shown = ["--trainer.enable_progress_bar=true"]
    main(["fit", *tiny_args(tiny_llama, tmp_path, 2, *FOUR_UPDATES, *shown)])
    assert seen == [("Rollouts", 1, 2), ("Rollouts", 2, 2)]  # not 8 optimizer steps, not a bar per epoch
    seen.clear()
    main(["fit", *tiny_args(tiny_llama, tmp_path, 5, *FOUR_UPDATES, *shown), "--ckpt_path", "last"])  # 3 more, across epochs
    assert seen == [("Rollouts", 3, 5), ("Rollouts", 4, 5), ("Rollouts", 5, 5)]


def test_max_rollouts_with_max_steps_is_refused_before_any_work(tiny_llama, tmp_path):
    message = r"model.max_rollouts=2 and trainer.max_steps=3 both set how long fit trains: keep one .*4 per rollout here"
    with pytest.raises(ValueError, match=message):
        main(["fit", *tiny_args(tiny_llama, tmp_path, 2, *FOUR_UPDATES, "--trainer.max_steps=3")])
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_fit_ends_with_the_run_its_held_out_table_and_commands_that_work(tiny_llama, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", *tiny_args(tiny_llama, Path("runs"), 4)])
    out = capsys.readouterr().out
    summary = out[out.index("Run: "):].splitlines()
    assert summary[0] == "Run: runs/quickstart/version_0 (4 rollouts)"
    assert summary[1] == "Held-out, after rollout 4:" and summary[2].split() == ["metric", "base", "tailored", "change"]
    last = {tag: values[-1] for tag, values in scalars(tmp_path / "runs" / "quickstart" / "version_0").items()}
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in summary[3:] if line.startswith("  ")}
    assert set(rows) == {"reward", "coverage", "no_repetition", "distinct_2", "corpus_distinct_2"}
    for metric, (base, tailored, change) in rows.items():  # the last validation's numbers, as TensorBoard has them
        assert base == pytest.approx(last[f"val/{metric}/base"], abs=5e-4), metric
        assert tailored == pytest.approx(last[f"val/{metric}/tailored"], abs=5e-4), metric
        assert change == pytest.approx(tailored - base, abs=1.5e-3), metric
    commands = {line.split(":")[0]: line.split(":", 1)[1].strip() for line in summary if line.startswith(("TensorBoard:", "Test it:", "Resume it:"))}
    assert commands["TensorBoard"].endswith("tensorboard --logdir runs/quickstart")
    test = shlex.split(commands["Test it"])
    assert test[1:4] == ["-m", "lightning_ipa", "test"] and Path(test[0]).samefile(sys.executable)
    main(test[3:] + ["--trainer.enable_progress_bar=false"])  # what it prints runs
    assert (tmp_path / "runs" / "quickstart" / "version_1" / "results.json").is_file()
    assert "--ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt" in commands["Resume it"]


def test_fit_help_shows_the_defaults_fit_uses(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    quickstart = yaml.safe_load(DEFAULT_CONFIG.read_text())
    rollouts, head_lr = quickstart["model"]["max_rollouts"], quickstart["model"]["head_lr"]
    assert head_lr != 1e-3  # IPAModule's own default, which the help showed before
    assert f"--model.max_rollouts MAX_ROLLOUTS How long ``fit`` trains, in rollouts" in help_text
    assert f"(type: Optional[int], default: {rollouts})" in help_text.split("--model.max_rollouts MAX_ROLLOUTS")[-1][:600]
    assert f"default: {head_lr})" in help_text.split("--model.head_lr HEAD_LR")[-1][:400]
    assert "default: 0)" in help_text.split("--seed_everything SEED_EVERYTHING")[-1][:300]


def test_a_plain_run_prints_no_warning_a_user_cannot_act_on(tiny_llama, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONWARNINGS", "JSONARGPARSE"))}  # as a user's shell
    args = tiny_args(tiny_llama, tmp_path, 2)
    done = subprocess.run([sys.executable, "-m", "lightning_ipa", "fit", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    for unwanted in ("Warning", "warn(", "deprecated", "Tip:", "max_steps="):
        assert unwanted not in output, output[max(0, output.index(unwanted) - 1500):][:3000]
    assert "Run: " in done.stdout and "Held-out, after rollout 2:" in done.stdout


def test_a_run_that_ended_on_a_checkpoint_between_validations_is_refused_at_its_real_count(tiny_llama, tmp_path):
    # the last rollout (3) is saved by every_n_rollouts in on_train_batch_end, where Lightning's `completed` still lags by one
    every_3 = ["--trainer.callbacks.every_n_rollouts=3"]
    cli = main(["fit", *tiny_args(tiny_llama, tmp_path, 3, *every_3)])  # validation after rollout 2 only
    assert cli.trainer.fit_loop.epoch_loop.batch_progress.total.processed == 3
    with pytest.raises(SystemExit, match="at rollout 3, and --model.max_rollouts is 3: nothing to train"):
        main(["fit", *tiny_args(tiny_llama, tmp_path, 3, *every_3), "--ckpt_path", "last"])
