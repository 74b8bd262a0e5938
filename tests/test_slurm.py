"""The SLURM recipes: their torchrun command parses with torchrun's own parser and the script's
flags with the real train.py / evaluate_fid.py parsers, under a made-up SLURM environment."""

import os
import re
import shlex

import pytest
from torch.distributed.run import get_args_parser

import evaluate_fid
import train
import train_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_ENV = {"SLURM_NNODES": "4", "SLURM_JOB_ID": "12345", "MASTER_ADDR": "node001",
             "MASTER_PORT": "29500", "GPUS_PER_NODE": "8"}  # fmt: skip


def torchrun_command(name: str, user_args: list[str], **env) -> list[str]:
    """The script's `srun ... torchrun ...` line, continuations joined, variables expanded
    (${X:-default} to its default where X is unset) and "$@" replaced by the user's flags;
    returns what follows `torchrun`."""
    env = {**SLURM_ENV, **env}
    with open(os.path.join(REPO, "scripts", "slurm", name)) as f:
        text = re.sub(r"\\\n\s*", " ", f.read())
    line = next(line for line in text.splitlines() if line.startswith("srun "))
    line = re.sub(
        r'"?\$\{?(\w+)(:-[^}]*)?\}?"?',
        lambda m: env.get(m.group(1), (m.group(2) or ":-")[2:]),
        line,
    )
    words = shlex.split(line.replace('"$@"', "").replace("$@", ""))
    return words[words.index("torchrun") + 1 :] + user_args


@pytest.mark.parametrize(
    "name, module, user_args",
    [
        ("train.sbatch", train, ["--data-path", "/data/imagenet/train", "--model", "DiT-XL/2"]),
        ("evaluate.sbatch", evaluate_fid, ["--ckpt", "a.pt", "--ref", "ref.npz"]),
        ("train.sbatch", train_classifier, ["--data-path", "/data/imagenet/train"]),
    ],
)
def test_slurm_script_torchrun_arguments_parse(name, module, user_args):
    env = {"TRAIN_SCRIPT": "train_classifier.py"} if module is train_classifier else {}
    args = get_args_parser().parse_args(torchrun_command(name, user_args, **env))
    assert (args.nnodes, args.nproc_per_node) == ("4", "8")
    assert (args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == (
        "c10d",
        "node001:29500",
        "12345",
    )
    assert args.training_script == f"{module.__name__}.py"
    flags = module.build_parser().parse_args(args.training_script_args)
    if module is train:
        assert flags.resume == "auto" and flags.model == "DiT-XL/2"
    elif module is train_classifier:
        assert flags.resume == "auto" and flags.data_path == "/data/imagenet/train"
    else:
        assert flags.ckpt == "a.pt" and flags.ref == "ref.npz"
