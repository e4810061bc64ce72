"""What a run survives: torn and corrupt checkpoints, SIGINT / SIGTERM / SIGKILL then a rerun (bit-identical to a run
never stopped, no duplicate log steps), non-finite training (stopped, or skipped within a budget), two processes on
one folder and a stale lock, a full disk during a checkpoint and during the student's write, a start that failed
before training, and a finished run run again. The toy preset at tiny size; real signals and a second process run
as subprocesses."""

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tdm import files
from tdm import run as rundir
from tdm.cli import main
from tdm.config import resolve
from tdm.errors import NonFiniteError
from tdm.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.progress=false", "net.hidden=64", "net.depth=2", "net.pretrain_steps=50", "net.pretrain_batch=256",
        "train.batch_size=64"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _same_student(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "student.safetensors")), load_file(str(b / "student.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _log(run: Path) -> list[dict]:
    strict = {"parse_constant": lambda c: pytest.fail(f"non-JSON constant {c} in the log")}
    return [json.loads(line, **strict) for line in (run / "train_log.jsonl").read_text().splitlines()]


def _without_time(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "wall_s"} for m in log]


# -- checkpoints: torn, corrupt, half-written --------------------------------------------------
STEPS = ["train.iterations=30", "train.checkpoint_every=10", "train.log_every=5"]


def _train(run: Path, *more: str):
    return Trainer(resolve("toy-gmm", [*TINY, *STEPS, *more]), run).train()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """30 iterations never stopped (one thread, as the tests that compare with it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = tmp_path_factory.mktemp("reference") / "r"
        _train(run)
    finally:
        torch.set_num_threads(n)
    return run


def _truncate(folder: Path) -> None:
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])


def _corrupt(folder: Path) -> None:  # same size, other bytes: only the hash sees it
    f = folder / "optimizer.bin"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


DAMAGE = {
    "torn": (lambda c: (c / "manifest.json").unlink(), "no manifest"),
    "truncated": (_truncate, "model.safetensors has 100 bytes"),
    "corrupt": (_corrupt, "optimizer.bin is corrupt"),
    "missing_file": (lambda c: (c / "random_states_0.pkl").unlink(), "missing random_states_0.pkl"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_named_and_skipped(damage, reference, tmp_path, capsys, one_thread):
    """The newest checkpoint is damaged: the run names it, resumes from the older complete one, and ends with the
    weights of a run never stopped."""
    run = tmp_path / "r"
    _train(run, "train.iterations=20")
    newest = run / "checkpoints" / "step_0000020"
    hurt, why = DAMAGE[damage]
    hurt(newest)
    capsys.readouterr()
    _train(run)
    err = capsys.readouterr().err
    assert f"skipped checkpoint step_0000020 ({why}" in err and "resuming from step_0000010" in err, err
    assert _same_student(run, reference)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000020", "step_0000030"]
    assert [m["step"] for m in _log(run)] == [5, 10, 15, 20, 25, 30]  # the resumed steps once each


def test_a_checkpoint_killed_half_written_is_ignored(reference, tmp_path, one_thread):
    """A kill during a checkpoint leaves `.partial_step_N`, never `step_N`: the rerun does not see it and the next
    checkpoint clears it."""
    run = tmp_path / "r"
    _train(run, "train.iterations=20")
    partial = run / "checkpoints" / ".partial_step_0000030"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)
    _train(run)
    assert not partial.exists() and _same_student(run, reference)


def test_no_complete_checkpoint_is_refused_not_overwritten(tmp_path, capsys, one_thread):
    """Only damaged checkpoints (or ones of a tdm older than manifests): starting afresh would write over them, so
    the run refuses, names them and the fix."""
    run = tmp_path / "r"
    _train(run, "train.iterations=10")
    (run / "student.safetensors").unlink()
    (run / "checkpoints" / "step_0000010" / "manifest.json").unlink()
    assert _distill(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no complete checkpoint" in err[0] and "step_0000010 (no manifest" in err[0], err
    assert (run / "checkpoints" / "step_0000010" / "model.safetensors").exists()


def test_keep_checkpoints_never_removes_the_newest(tmp_path, one_thread):
    run = tmp_path / "r"
    _train(run, "train.keep_checkpoints=1")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000030"]
    assert rundir.Checkpoints.problem(run / "checkpoints" / "step_0000030") is None


def test_atomic_write_keeps_the_old_file_when_a_write_fails(tmp_path):
    path = tmp_path / "a.json"
    files.write_json(path, {"a": 1})

    def full(tmp: Path):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError):
        files.atomic_write(path, full)
    assert json.loads(path.read_text()) == {"a": 1} and list(tmp_path.iterdir()) == [path]
    with pytest.raises(ValueError):  # strict JSON: no NaN
        files.write_json(path, {"a": float("nan")})


# -- a full disk ---------------------------------------------------------------------------------
def _distill(run: Path, *more: str) -> int:
    return main(["distill", "--preset", "toy-gmm", "--output", str(run), "--no-eval", *TINY, *STEPS, *more])


def test_disk_full_during_a_checkpoint(reference, tmp_path, monkeypatch, capsys, one_thread):
    """The second checkpoint's write fails half-way with ENOSPC: one line naming the checkpoint, the reason and the
    intact one; no partial folder; the rerun resumes from step 10 and matches the run never stopped."""
    import accelerate.checkpointing

    real = accelerate.checkpointing.save

    def full(obj, f, *args, **kwargs):
        if "step_0000020" in str(f):
            Path(f).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real(obj, f, *args, **kwargs)

    run = tmp_path / "r"
    monkeypatch.setattr(accelerate.checkpointing, "save", full)
    assert _distill(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not write checkpoint step_0000020" in err[0], err
    assert "No space left on device" in err[0] and "(step_0000010) is intact" in err[0]
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_0000010"]
    monkeypatch.undo()
    assert _distill(run) == 0
    assert _same_student(run, reference)


def test_disk_full_while_writing_the_student(reference, tmp_path, monkeypatch, capsys, one_thread):
    import safetensors.torch

    real = safetensors.torch.save_file

    def full(tensors, filename, *args, **kwargs):
        if "student" in str(filename):
            Path(filename).write_bytes(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *args, **kwargs)

    run = tmp_path / "r"
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert _distill(run) == 2
    err = capsys.readouterr().err
    assert "could not write" in err and "student.safetensors" in err and "run the same command" in err, err
    assert not [p for p in run.iterdir() if "student" in p.name]  # neither the file nor a partial one
    monkeypatch.undo()
    assert _distill(run) == 0
    assert "resumed from step 30" in capsys.readouterr().out and _same_student(run, reference)


# -- non-finite training -------------------------------------------------------------------------
def test_nonfinite_training_stops_naming_step_and_role(tmp_path, capsys, one_thread):
    """An absurd learning rate: exit code 3, one line naming the step and the role, nothing saved from that step on,
    a strict-JSON log."""
    run = tmp_path / "r"
    code = _distill(run, "train.checkpoint_every=1", "train.log_every=1", "optim.lr_fake=1e4", "optim.lr_student=1e4")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    found = re.search(r"non-finite (loss|gradient norm) of the (fake score|student) at step (\d+)", err[0])
    assert found and "optim.lr_" in err[0] and "train.max_nonfinite_skips" in err[0], err[0]
    bad = int(found[3])
    saved = sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*"))
    assert all(s < bad for s in saved)
    assert (f"last checkpoint: step_{saved[-1]:07d}" if saved else "last checkpoint: none yet") in err[0]
    assert not (run / "student.safetensors").exists()
    log = _log(run) if (run / "train_log.jsonl").exists() else []
    assert all(m["step"] < bad for m in log)


def _poison(monkeypatch, steps: set[int]):
    """A NaN fake-score loss at `steps` (fault injection: a real run rarely fails on cue)."""
    real = Trainer._update

    def update(self, role, loss):
        if role == "fake" and self.state.step + 1 in steps:
            loss = loss * float("nan")
        return real(self, role, loss)

    monkeypatch.setattr(Trainer, "_update", update)


def test_nonfinite_steps_are_skipped_within_a_budget(tmp_path, monkeypatch, one_thread):
    _poison(monkeypatch, {3, 5})
    runs = tmp_path / "ok", tmp_path / "over"
    _train(runs[0], "train.max_nonfinite_skips=2", "train.log_every=1", "train.iterations=8")
    log = {m["step"]: m for m in _log(runs[0])}
    assert log[3]["skipped"] == ["fake"] and log[3]["grad_norm_fake"] is None  # JSON null, not NaN
    assert "skipped" not in log[4] and log[4]["grad_norm_fake"] is not None
    assert all(torch.isfinite(w).all() for w in load_file(str(runs[0] / "student.safetensors")).values())
    with pytest.raises(NonFiniteError, match="at step 5 .1 skips allowed, all spent"):
        _train(runs[1], "train.max_nonfinite_skips=1", "train.iterations=8")
    with pytest.raises(NonFiniteError, match="non-finite loss of the fake score at step 3"):
        _train(tmp_path / "none", "train.iterations=8")


# -- signals and kills, then the same command again -------------------------------------------
SIGNAL_ARGS = ["--preset", "toy-gmm", "--no-eval", *TINY, "train.iterations=300", "train.log_every=1",
               "train.checkpoint_every=25"]


def _command(run: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "tdm.cli", "distill", "--output", str(run), *SIGNAL_ARGS, *more]


def _wait_for(condition, timeout: float = 180):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def _log_lines(run: Path) -> int:
    path = run / "train_log.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "r"
    done = subprocess.run(_command(run), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return run


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_stopped_then_rerun_is_bit_identical(sig, uninterrupted, tmp_path):
    """SIGINT / SIGTERM: the iteration in flight finishes, a checkpoint is written, one line, exit 130 / 143.
    SIGKILL: nothing runs, every file is whole anyway. The same command again finishes with the weights and the
    log (every step once) of the run never stopped."""
    run = tmp_path / "r"
    proc = subprocess.Popen(_command(run), env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(lambda: _log_lines(run) >= 30 or proc.poll() is not None)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + sig, err
        lines = err.strip().splitlines()
        stop = re.fullmatch(rf"tdm distill: interrupted by {sig.name} at step (\d+): checkpoint step_(\d+) "
                            r"written; run the same command to resume", lines[-1])
        assert len(lines) == 1 and stop and stop[1] == stop[2].lstrip("0"), err
        assert rundir.Checkpoints.problem(run / "checkpoints" / f"step_{stop[2]}") is None
    assert not (run / "student.safetensors").exists()
    done = subprocess.run(_command(run), env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if sig != signal.SIGKILL:
        assert f"resumed from step {stop[1]}" in done.stdout
    assert _same_student(run, uninterrupted)
    assert _without_time(_log(run)) == _without_time(_log(uninterrupted))


def test_two_processes_stop_at_the_same_iteration(tmp_path):
    """torchrun relays SIGINT to both workers, which may see it in different iterations: they agree at an iteration
    boundary, both write their random states into one complete checkpoint, and the rerun finishes the log."""
    run = tmp_path / "ddp"
    env = dict(ENV, ACCELERATE_USE_CPU="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd = [*launch, *_command(run)[1:]]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _log_lines(run) >= 10 or proc.poll() is not None)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    stops = re.findall(r"interrupted by SIGINT at step (\d+): checkpoint step_\d+ written", err)
    assert len(stops) == 2 and stops[0] == stops[1], err[-3000:]
    checkpoint = run / "checkpoints" / f"step_{int(stops[0]):07d}"
    assert rundir.Checkpoints.problem(checkpoint) is None
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [m["step"] for m in _log(run)] == list(range(1, 301))


# -- one run per folder ----------------------------------------------------------------------------
def test_a_second_process_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys, one_thread):
    run = tmp_path / "r"
    forever = ["train.iterations=100000000", "train.checkpoint_every=100000000"]
    proc = subprocess.Popen(_command(run, *forever), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: _log_lines(run) >= 1 or proc.poll() is not None)
        assert main(["distill", "--output", str(run), *SIGNAL_ARGS, *forever]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by process {proc.pid}" in err[0] and "another --output" in err[0], err
    finally:
        proc.kill()
        proc.wait()
    assert json.loads((run / "tdm.lock").read_text())["pid"] == proc.pid  # left behind: stale
    assert main(["distill", "--output", str(run), *SIGNAL_ARGS, "train.iterations=5"]) == 0
    assert f"took over the lock of process {proc.pid}" in capsys.readouterr().err
    assert [m["step"] for m in _log(run)] == [1, 2, 3, 4, 5]  # the killed run's lines are gone with its progress


# -- starts and restarts ---------------------------------------------------------------------------
def test_a_start_that_failed_before_training_leaves_the_folder_reusable(tmp_path, monkeypatch, capsys, one_thread):
    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tdm.families.toy.family.fit_diffusion", ctrl_c)  # Ctrl-C while the MLP teacher is fitted
    run = tmp_path / "r"
    assert _distill(run) == 130
    assert "interrupted by SIGINT" in capsys.readouterr().err and (run / "config.yaml").exists()
    monkeypatch.undo()
    assert _distill(run, "student.steps=2") == 0  # another config: nothing trained, so the folder is free
    assert "never trained; starting afresh" in capsys.readouterr().err


def test_a_finished_run_says_so_and_evaluates_only_when_asked(tmp_path, capsys, one_thread):
    run = tmp_path / "r"
    cmd = ["distill", "--preset", "toy-gmm", "--output", str(run), *TINY, "train.iterations=3",
           "train.eval_samples=100"]
    assert main(cmd) == 0
    metrics = run / "metrics.json"
    first = metrics.stat().st_mtime_ns
    capsys.readouterr()
    assert main(cmd) == 0
    assert "is a finished run (3 iterations): nothing to do" in capsys.readouterr().out
    assert metrics.stat().st_mtime_ns == first
    metrics.unlink()  # as if the first command died while evaluating
    assert main(cmd) == 0 and metrics.exists()
    assert main(["eval", str(run), "--n", "50"]) == 0 and json.loads(metrics.read_text())["n_samples"] == 50


def _write_many(path: str, n: int) -> None:
    for i in range(n):
        files.write_text(path, f"{i}\n" * 1000)


def test_two_processes_writing_one_file_at_once(tmp_path):
    """The prompt cache of a 2-process run is written by both ranks: each atomic write must use its own temporary
    name, or one process renames the other's half-written file away (FileNotFoundError, then exit 2)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    path = str(tmp_path / "cache.txt")
    workers = [ctx.Process(target=_write_many, args=(path, 300)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert [w.exitcode for w in workers] == [0, 0]
    assert Path(path).read_text().count("\n") == 1000 and list(tmp_path.iterdir()) == [Path(path)]
