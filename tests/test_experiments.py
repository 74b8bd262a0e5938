"""The study runner: skip and resume with tiny real runs, the aggregation's arithmetic against
scipy, and the ImageNet-scale commands through the real parsers."""

import json
import os
import shlex
import shutil

import numpy as np
import pytest
from scipy import stats
from torch.distributed.run import get_args_parser

import evaluate_fid
import train
import train_classifier
from experiments import run
from experiments.aggregate import collect, table, welch_interval


def test_welch_interval_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 0.02, 3), rng.normal(0.53, 0.05, 4)
    diff, low, high = welch_interval(a, b)
    expected = stats.ttest_ind(b, a, equal_var=False).confidence_interval(0.95)
    assert diff == pytest.approx(b.mean() - a.mean(), rel=1e-12)
    assert (low, high) == pytest.approx((expected.low, expected.high), rel=1e-10)


def test_table_reports_mean_std_and_interval_against_the_baseline():
    cells = {("M", "mhsa"): {"fid": [10.0, 12.0, 11.0]}, ("M", "vca"): {"fid": [9.0, 9.5, 8.5]}}
    text = table(cells, "mhsa")
    diff, low, high = welch_interval([10.0, 12.0, 11.0], [9.0, 9.5, 8.5])
    assert "| M | mhsa | 3 | 11.0000 ± 1.0000 | - |" in text
    assert f"| M | vca | 3 | 9.0000 ± 0.5000 | {diff:+.4f} [{low:+.4f}, {high:+.4f}] |" in text


def test_table_reports_the_evaluations_bootstrap_noise():
    cells = {
        ("M", "mhsa"): {"class_accuracy": [0.4, 0.5], "class_accuracy_bootstrap_se": [0.01, 0.02]}
    }
    text = table(cells, "mhsa")
    assert "eval noise (SE)" in text.splitlines()[0]
    assert text.splitlines()[-1].endswith("| 0.0150 |")


def test_top_k_accuracy_noise_is_binomial(tmp_path):
    for seed, top1 in enumerate((0.2, 0.3)):
        run_dir = tmp_path / "deit-vca" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        metrics = {"top1": top1, "top5": 0.5, "num_samples": 1000}
        (run_dir / "eval.json").write_text(json.dumps({"metrics": metrics}))
    values = collect(tmp_path, [("deit", "vca")])[("deit", "vca")]
    assert values["top1"] == [0.2, 0.3]
    expected = [np.sqrt(0.2 * 0.8 / 1000), np.sqrt(0.3 * 0.7 / 1000)]
    assert values["top1_bootstrap_se"] == pytest.approx(expected, rel=1e-12)


def test_runner_runs_skips_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VCA_DIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    argv = ["paper-main", "--scale", "demo", "--only", "DiT-T/4:mhsa", "DiT-T/4:vca",
            "--seeds", "2", "--steps", "2", "--eval-samples", "20", "--sampling-steps", "2",
            "--out", str(tmp_path / "studies")]  # fmt: skip
    assert run.main([*argv, "--jobs", "2"]) == 0
    folder = tmp_path / "studies" / "demo"
    summary = (folder / "paper-main.md").read_text()
    assert "| DiT-T/4 | mhsa | 2 |" in summary and "| DiT-T/4 | vca | 2 |" in summary
    assert (folder / "paper-main.png").exists()
    assert "saved checkpoint" in (folder / "DiT-T-4-vca" / "seed0" / "console.txt").read_text()
    capsys.readouterr()

    done = folder / "DiT-T-4-vca" / "seed1"
    stamp = os.path.getmtime(done / "eval.json")
    os.remove(folder / "DiT-T-4-mhsa" / "seed0" / "eval.json")  # interrupted: no evaluation
    os.remove(folder / "DiT-T-4-mhsa" / "seed0" / "checkpoints" / "0000002.pt")  # nor step 2
    assert run.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("done already") == 3 and os.path.getmtime(done / "eval.json") == stamp
    log = (folder / "DiT-T-4-mhsa" / "seed0" / "log.txt").read_text()
    assert "resumed from" in log and "0000001.pt at step 1" in log

    # the same study under another spelling of --out is the same study
    assert run.main([*argv[:-1], str(tmp_path / "studies") + "/."]) == 0
    assert capsys.readouterr().out.count("done already") == 4

    # other settings in the same folder are refused before anything runs, not mixed in
    shutil.rmtree(folder / "DiT-T-4-mhsa" / "seed0")  # a run that would come first
    longer = [*argv[:9], "3", *argv[10:]]
    assert longer[8:10] == ["--steps", "3"] and run.main(longer) == 2
    assert "--max-steps 2 -> 3" in capsys.readouterr().err
    more_samples = [*argv[:11], "30", *argv[12:]]
    assert more_samples[10:12] == ["--eval-samples", "30"] and run.main(more_samples) == 2
    assert "--num-samples 20 -> 30" in capsys.readouterr().err
    assert not (folder / "DiT-T-4-mhsa" / "seed0").exists()
    for seed_dir in folder.glob("DiT-T-4-*/seed*"):  # folders from before commands.json
        os.remove(seed_dir / run.COMMANDS)
    assert run.main(longer) == 2
    assert "holds a run of 2 steps, not 3" in capsys.readouterr().err

    # the ablation table shares the full VCA's runs and summarises only its own cells
    ablation = ["paper-ablation", *argv[1:3], "--only", "DiT-T/4:vca", *argv[5:]]
    assert run.main(ablation) == 0
    assert capsys.readouterr().out.count("done already") == 2
    summary = (folder / "paper-ablation.md").read_text()
    assert "| DiT-T/4 | vca | 2 |" in summary and "mhsa |" not in summary


def test_runner_refuses_a_cell_the_table_lacks(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        run.main(["paper-ablation", "--only", "DiT-T/4:mhsa", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "lacks" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--scale", "imagenet", "--nodes", "0"], "--nodes must be at least 1, got 0"),
        (["--eval-samples", "-5"], "--eval-samples must be at least 1, got -5"),
        (["--eval-samples", "0"], "--eval-samples must be at least 1, got 0"),
        (["--sampling-steps", "1"], "--sampling-steps must be at least 2, got 1"),
    ],
)
def test_runner_refuses_bad_numbers_before_any_run(tmp_path, capsys, extra, message):
    """Each would otherwise reach the scripts only after a run's training, or write sbatch
    lines that cannot run."""
    with pytest.raises(SystemExit) as exit_:
        run.main(["paper-main", *extra, "--only", "DiT-T/4:vca", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert "Traceback" not in err and not any(tmp_path.iterdir())


def test_imagenet_scale_writes_commands_that_parse(tmp_path):
    assert run.main(["paper-ablation", "--scale", "imagenet", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "imagenet" / "paper-ablation.sh").read_text().splitlines()
    torchruns = [shlex.split(line)[1:] for line in lines if line.startswith("torchrun ")]
    assert len(torchruns) == 2 * 6 * 3  # train and evaluate, 6 attentions, 3 seeds
    for words in torchruns:
        launch = get_args_parser().parse_args(words)
        script = {"train.py": train, "evaluate_fid.py": evaluate_fid}[launch.training_script]
        script.build_parser().parse_args(launch.training_script_args)
    assert sum(line.startswith("job=$(sbatch") for line in lines) == 18


def test_imagenet_runs_keep_every_checkpoint_they_write(tmp_path):
    """An FID-over-training curve needs every --ckpt-every checkpoint, not the newest 3 that
    --keep-checkpoints keeps by default; the script says so."""
    assert run.main(["paper-main", "--scale", "imagenet", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "imagenet" / "paper-main.sh").read_text()
    lines = text.splitlines()
    trains = [
        shlex.split(line)[3:]
        for line in lines
        if line.startswith("torchrun ") and " train.py " in line
    ]
    assert len(trains) == 5 * 2 * 3  # 5 models, mhsa and vca, 3 seeds
    for words in trains:
        args = train.build_parser().parse_args(words)
        assert args.keep_checkpoints == 0 and args.ckpt_every < args.max_steps
    assert "# --keep-checkpoints 0: each run keeps every --ckpt-every checkpoint" in text


def test_imagenet_classification_writes_train_classifier_commands_that_parse(tmp_path):
    assert run.main(["paper-classification", "--scale", "imagenet", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "imagenet" / "paper-classification.sh").read_text().splitlines()
    torchruns = [shlex.split(line)[1:] for line in lines if line.startswith("torchrun ")]
    assert len(torchruns) == 4 * 2 * 3  # 4 backbones, native and vca, 3 seeds; no evaluate_fid
    for words in torchruns:
        launch = get_args_parser().parse_args(words)
        assert launch.training_script == "train_classifier.py"
        args = train_classifier.build_parser().parse_args(launch.training_script_args)
        train_classifier.config_from_args(args)  # the config's own checks pass too
    sbatch = [line for line in lines if line.startswith("sbatch ")]
    assert len(sbatch) == 24 and all("TRAIN_SCRIPT=train_classifier.py" in s for s in sbatch)
