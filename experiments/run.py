"""Run one of the paper's tables, seed by seed, and aggregate it.

    python -m experiments.run paper-main --scale demo            # this machine, built-in data
    python -m experiments.run paper-ablation --scale demo
    python -m experiments.run paper-main --scale imagenet        # torchrun and sbatch commands
    python -m experiments.run paper-classification --scale demo  # DeiT-T-shaped, native vs vca

Each cell x seed is an ordinary train.py run then an evaluate_fid.py run (for classification one
train_classifier.py run, which evaluates itself) in
<out>/<scale>/<model>-<attention>/seed<k>; tables that share a cell (the full VCA is in both)
share its runs. A rerun skips the runs whose eval.json exists and resumes the others from their
newest checkpoint, so a study can be done in parts. At the end <table>.md (mean ± std over
seeds, the difference to the table's baseline with a 95% Welch interval, the evaluation's own
noise) and <table>.png are written beside the runs.
"""

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from common import InputError, atomic_write
from common.cli import ArgumentParser, report
from engine.errors import UsageError
from engine.sampling import MIN_STEPS

from .aggregate import run_folder, write_summary
from .tables import SCALES, TABLES, cells

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_commands(model, attention, seed, folder, scale, steps, extra_eval=()):
    """The training and evaluate_fid.py argument lists of one run (no evaluation when the
    training script scores the run itself)."""
    run_dir = os.path.join(folder, run_folder(model, attention), f"seed{seed}")
    family = model.split("-")[0]
    train = [*scale.train, *scale.objectives.get(family, ()), "--model", model, "--attention",
             attention, "--global-seed", str(seed), "--max-steps", str(steps), "--ckpt-every",
             str(max(1, steps // 4)), "--results-dir", run_dir, "--resume"]  # fmt: skip
    if scale.evaluate is None:
        return train, None
    ckpt = os.path.join(run_dir, "checkpoints", f"{steps:07d}.pt")
    sampler = scale.samplers.get(family, ())
    evaluate = [*scale.evaluate, *sampler, "--ckpt", ckpt, "--seed", str(seed),
                "--sample-dir", os.path.join(run_dir, "eval"),
                "--json", os.path.join(run_dir, "eval.json"), *extra_eval]  # fmt: skip
    return train, evaluate


def run_locally(runs, script: str, log, jobs: int = 1) -> None:
    """Each run's training `script`, then its evaluate_fid.py (if any), as subprocesses, `jobs`
    runs at a time; runs whose eval.json exists are skipped. Beside each other, runs share the
    cores' threads (two 1-thread runs train 1.4x faster than two 2-thread runs in turn on 2
    cores) and write their output to console.txt in their folder. Every folder is checked
    before any run starts: one that holds a run of other settings is refused."""
    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    for train, evaluate in runs:
        check_same_run(train, evaluate)

    def one(train, evaluate):
        run_dir = train[train.index("--results-dir") + 1]
        json_path = os.path.join(run_dir, "eval.json")
        if os.path.exists(json_path):
            log(f"done already: {json_path}")
            return
        with atomic_write(os.path.join(run_dir, COMMANDS), "w") as f:
            json.dump({"train": train, "evaluate": evaluate}, f, indent=1)
        steps = [(script, train)] + ([("evaluate_fid.py", evaluate)] if evaluate else [])
        for name, args in steps:
            log(f"{name} {shlex.join(args)}")
            if jobs == 1:
                subprocess.run([sys.executable, name, *args], cwd=REPO, check=True)
                continue
            with open(os.path.join(run_dir, "console.txt"), "a") as out:
                subprocess.run([sys.executable, name, *args], cwd=REPO, env=env, check=True,
                               stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        log(f"finished: {json_path}")

    with ThreadPoolExecutor(jobs) as pool:
        for done in [pool.submit(one, *run) for run in runs]:
            done.result()  # the first failure, once every run has ended


COMMANDS = "commands.json"  # in each run folder: the argument lists the run was started with
# Where a run's files go: derived from the run folder, so compared as the folder, not as text
# (--out studies and --out ./studies are the same study).
RUN_PATHS = ("--results-dir", "--ckpt", "--sample-dir", "--json")


def flag_values(args: list[str]) -> dict[str, str]:
    """{flag: its value(s)} of an argument list ("" for a bare switch)."""
    values, flag = {}, None
    for arg in args:
        if arg.startswith("--"):
            flag = arg
            values[flag] = ""
        elif flag is not None:
            values[flag] = f"{values[flag]} {arg}".strip()
    return values


def check_same_run(train: list[str], evaluate: list[str] | None) -> None:
    """A run folder holds the run of one set of settings: a table whose definition changed, or
    another --steps, is another study, in another --out folder, not a silent mix of old and new
    runs. Folders made before commands.json was written are checked by their step count."""
    run_dir = train[train.index("--results-dir") + 1]
    path = os.path.join(run_dir, COMMANDS)
    if not os.path.exists(path):
        json_path = os.path.join(run_dir, "eval.json")
        if os.path.exists(json_path):
            check_budget(json_path, int(train[train.index("--max-steps") + 1]))
        return
    try:
        with open(path) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is unreadable ({err}); remove it to rerun the run") from None
    changed = []
    for part, now in (("train", train), ("evaluate", evaluate)):
        before, after = flag_values(recorded.get(part) or []), flag_values(now or [])
        for flag in sorted((before.keys() | after.keys()) - set(RUN_PATHS)):
            if before.get(flag) != after.get(flag):
                was, new = before.get(flag, "unset"), after.get(flag, "unset")
                changed.append(f"{flag} {was or 'on'} -> {new or 'on'}")
    if changed:
        raise UsageError(
            f"{run_dir} holds a run of other settings ({', '.join(changed)}); put a study "
            "with other settings in another --out folder"
        )


def check_budget(json_path: str, steps: int) -> None:
    """A finished run counts only for the same number of steps: another budget is another
    study, in another --out folder, not a silent mix."""
    with open(json_path) as f:
        report = json.load(f)
    done = report.get("step")
    if done is None:  # evaluate_fid.py's report names the checkpoint, <step>.pt
        done = int(os.path.basename(report["checkpoint"]).split(".")[0])
    if done != steps:
        raise UsageError(
            f"{os.path.dirname(json_path)} holds a run of {done} steps, not {steps}; "
            "put a study with another budget in another --out folder"
        )


def write_cluster_commands(runs, script: str, folder, table: str, nodes: int) -> str:
    """<table>.sh: per run the torchrun lines and the chained sbatch submissions."""
    lines = ["#!/bin/bash", "# torchrun on one node of 8 GPUs per run, or the sbatch jobs below"]
    if flag_values(runs[0][0]).get("--keep-checkpoints") == "0":
        lines += [
            "# --keep-checkpoints 0: each run keeps every --ckpt-every checkpoint, not only the",
            "# newest 3, so each can be evaluated later, e.g. for an FID-over-training curve",
        ]
    for train, evaluate in runs:
        lines.append(f"torchrun --nproc_per_node=8 {script} " + shlex.join(train))
        if evaluate:
            lines.append("torchrun --nproc_per_node=8 evaluate_fid.py " + shlex.join(evaluate))
        submit = f"sbatch --parsable --export=ALL,TRAIN_SCRIPT={script} --nodes={nodes}"
        resumable = shlex.join([a for a in train if a != "--resume"])
        if not evaluate:
            lines.append(f"{submit} scripts/slurm/train.sbatch {resumable}")
            continue
        lines.append(f"job=$({submit} scripts/slurm/train.sbatch {resumable})")
        lines.append(
            "sbatch --dependency=afterok:$job --nodes=1 scripts/slurm/evaluate.sbatch "
            + shlex.join(evaluate)
        )
    path = os.path.join(folder, f"{table}.sh")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m experiments.run", description=__doc__.split("\n")[0])
    parser.add_argument("table", choices=list(TABLES), help="which table of the paper")
    parser.add_argument("--scale", choices=SCALES, default="demo", help="(default demo)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    parser.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the scale's)"
    )
    parser.add_argument("--only", nargs="+", metavar="MODEL:ATTENTION", default=None,
                        help="run only these cells, e.g. DiT-T/4:vca")  # fmt: skip
    parser.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help="evaluation images per run (default: the scale's, 500 at demo and 50000 at "
        "ImageNet scale)",
    )
    parser.add_argument(
        "--sampling-steps",
        type=int,
        default=None,
        help=f"sampler steps of the evaluation, {MIN_STEPS} or more (default: the scale's "
        "sampler's)",
    )
    parser.add_argument(
        "--jobs", type=int, default=1, help="demo runs side by side, sharing the cores (default 1)"
    )
    parser.add_argument(
        "--nodes", type=int, default=4, help="sbatch nodes per run at ImageNet scale (default 4)"
    )
    parser.add_argument("--out", default="studies", help="folder of the studies (default studies)")
    args = parser.parse_args(argv)
    table = TABLES[args.table]
    scale = table.scales[args.scale]
    # Checked here, not by the scripts they reach: a bad value would stop each run only after
    # its training.
    for flag, value, least in [("--seeds", args.seeds, 1), ("--jobs", args.jobs, 1),
                               ("--nodes", args.nodes, 1), ("--steps", args.steps, 1),
                               ("--eval-samples", args.eval_samples, 1),
                               ("--sampling-steps", args.sampling_steps, MIN_STEPS)]:  # fmt: skip
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    chosen = cells(args.table, scale)
    if args.only:
        wanted = {tuple(item.split(":", 1)) for item in args.only}
        if wanted - set(chosen):
            names = ", ".join(f"{m}:{a}" for m, a in chosen)
            parser.error(f"--only names a cell {args.table} lacks at this scale; it has {names}")
        chosen = [cell for cell in chosen if cell in wanted]
    folder = os.path.join(args.out, args.scale)
    steps = args.steps or scale.steps
    extra_eval = []
    if args.eval_samples is not None:
        extra_eval += ["--num-samples", str(args.eval_samples)]
    if args.sampling_steps is not None:
        extra_eval += ["--num-sampling-steps", str(args.sampling_steps)]
    runs = [
        run_commands(model, attention, seed, folder, scale, steps, extra_eval)
        for model, attention in chosen
        for seed in range(args.seeds)
    ]
    if args.scale == "imagenet":
        path = write_cluster_commands(runs, scale.script, folder, args.table, args.nodes)
        print(f"wrote {path}")
        return 0
    try:
        run_locally(runs, scale.script, lambda line: print(line, flush=True), args.jobs)
        print(write_summary(folder, args.table, table.baseline, cells(args.table, scale)))
    except subprocess.CalledProcessError as err:
        print(f"error: a run failed ({err.cmd[1]}, exit {err.returncode}); rerun to resume it",
              file=sys.stderr)  # fmt: skip
        return 1
    except InputError as err:
        return report(err)
    print(f"summary: {os.path.join(folder, args.table + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
