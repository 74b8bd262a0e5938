"""Crash hygiene of training runs: kill -9 at random moments, SIGTERM at any time, leftovers of
interrupted writes, pruning next to unreadable checkpoints."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from test_train import assert_states_equal, checkpoint_at, tiny_args

import train
from engine.checkpoint import list_checkpoints, prune_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny(results, *extra, steps=8):
    """test_train's tiny run, with a checkpoint at every step."""
    return tiny_args(results, "--ckpt-every", "1", *extra, steps=steps)


def test_random_kill_9_then_resume_is_bit_exact(tmp_path):
    """Kill -9 a few times at random moments (a checkpoint is written every step, so some kills
    land inside a write), resume each time: model, EMA and optimizer end bit-exact with an
    uninterrupted run, every file in the checkpoint folder loads, and metrics.jsonl holds each
    step once."""
    torch.set_num_threads(1)
    assert train.main(tiny(tmp_path / "one")) == 0
    rng = random.Random(1234)  # fixed kill times in CI
    cmd = [sys.executable, "train.py", *tiny(tmp_path / "killed", "--resume")]
    kills = 0
    for _ in range(12):
        proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
        if kills < 3:
            target = rng.randint(1, 6)
            for line in proc.stdout:
                if f"step {target:07d}" in line or "done at step" in line:
                    break
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
    assert kills >= 1 and proc.returncode == 0
    one, killed = checkpoint_at(tmp_path / "one", 8), checkpoint_at(tmp_path / "killed", 8)
    keys = ("model", "ema", "opt", "step", "epoch", "batch_in_epoch")
    assert_states_equal({k: one[k] for k in keys}, {k: killed[k] for k in keys})
    folder = tmp_path / "killed" / "checkpoints"
    for name in os.listdir(folder):  # no leftovers, nothing torn
        torch.load(folder / name, map_location="cpu", weights_only=True)
    with open(tmp_path / "killed" / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, 9))


def test_sigterm_during_startup_still_checkpoints(tmp_path):
    """SIGTERM as soon as train.py catches it, while torch is still being imported: the run
    checkpoints and exits 0."""
    cmd = [sys.executable, "train.py", *tiny(tmp_path, steps=1000)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    while not catches_sigterm(proc.pid):
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "SIGTERM" in out
    assert [step for step, _ in list_checkpoints(tmp_path / "checkpoints")] == [0]


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a SIGTERM handler (Linux: the SigCgt mask in /proc)."""
    with open(f"/proc/{pid}/status") as f:
        caught = next(line for line in f if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def test_sigterm_after_the_loss_went_non_finite_writes_no_checkpoint(tmp_path, capsys):
    """The stop path checks finiteness as the periodic save does: lr 1e30 makes step 2's loss
    non-finite, a SIGTERM at step 3 must not save those weights as a checkpoint."""
    from engine.trainer import Trainer

    original = Trainer.__init__

    def with_spy(self, config):
        original(self, config)
        losses = self.train_step.objective.training_losses

        def spy(*args, **kwargs):
            if self.step == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return losses(*args, **kwargs)

        self.train_step.objective.training_losses = spy

    Trainer.__init__ = with_spy
    try:
        code = train.main(tiny(tmp_path, "--lr", "1e30", "--ckpt-every", "1000", steps=5))
    finally:
        Trainer.__init__ = original
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    assert code == 1
    assert "non-finite" in capsys.readouterr().err
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_leftovers_are_swept_and_pruning_keeps_the_newest_loadable(tmp_path):
    """A kill mid-write leaves a temporary file: the next start removes it. Pruning keeps the
    newest checkpoints that load and deletes unreadable ones instead of keeping them."""
    assert train.main(tiny(tmp_path, steps=2)) == 0
    folder = tmp_path / "checkpoints"
    (folder / ".0000003.pt.0123456789ab.tmp").write_bytes(b"half a checkpoint")
    (folder / ".tmp-abcd.pt").write_bytes(b"an older version's leftover")
    (folder / "0000009.pt").write_bytes(b"torn")  # newer, unreadable
    assert train.main(tiny(tmp_path, "--resume", "--keep-checkpoints", "2", steps=4)) == 0
    assert sorted(os.listdir(folder)) == ["0000003.pt", "0000004.pt"]
    (folder / "0000007.pt").write_bytes(b"torn")
    prune_checkpoints(str(folder), keep=1)
    assert os.listdir(folder) == ["0000004.pt"]


class Payload:
    """Pickled, it would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payloads_in_checkpoints_never_run(tmp_path, capsys):
    """Checkpoints load with weights_only=True: a file carrying a pickle payload is refused in
    one line by sample.py and by train.py --resume, and the payload never runs."""
    import sample

    marker = tmp_path / "payload-ran"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "ema": {}, "args": {"x": Payload(marker)}}, evil)
    assert sample.main(["--ckpt", str(evil), "--out", str(tmp_path / "g.png")]) == 2
    assert train.main(tiny(tmp_path / "run", "--resume", str(evil))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("cannot read checkpoint" in line for line in err)
    assert not marker.exists()
