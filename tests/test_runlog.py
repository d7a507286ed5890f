"""dreamprm/runlog.py: metrics.jsonl on resume, per-source rows, the progress line."""

import pytest
import torch

from dreamprm.errors import DataError
from dreamprm.runlog import hms, progress_line, source_row, truncate_metrics


def test_a_torn_last_metrics_line_is_dropped_and_other_damage_named(tmp_path):
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')
    note = truncate_metrics(m, 2)
    assert "torn last line" in note and f"{m}:4" in note
    assert m.read_text() == '{"step": 1}\n{"step": 2}\n'
    m.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(DataError, match=f"{m}:2: not JSON"):
        truncate_metrics(m, 2)


def test_source_rows_have_means_only_where_a_source_was_drawn():
    sums = torch.tensor([[4.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    row = source_row(["a", "b"], sums, object())
    assert row == {"src/a/n": 4.0, "src/a/loss": 0.5, "src/a/w": 0.75, "src/b/n": 0.0}


def test_the_progress_line_gives_the_eta_from_this_process_alone():
    row = {"step": 150, "loss": 0.25, "tokens_per_s": 12345.6}
    line = progress_line(row, 200, 50, 100.0)  # 50 updates in 100 s, 50 to go
    assert line == "update 150/200  loss 0.2500  meta loss -  tokens/s 12,346  ETA 0:01:40"
    assert hms(3725.4) == "1:02:05"


def test_a_stdout_that_went_away_does_not_fail_the_run(tmp_path):
    """Ctrl+C under `deepspeed ... | tee log` ends tee: the next print must not raise BrokenPipeError."""
    import subprocess
    import sys

    code = ("import os, sys\n"
            "from dreamprm.runlog import print0\n"
            "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"  # stdout: a pipe nobody reads any more
            "print0('stopped by signal at update 3'); print0('again')\n"
            "print('survived', file=sys.stderr)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "survived\n", p.stderr


def test_wandb_mode_disabled_in_the_environment_wins(monkeypatch):
    from dreamprm.config import Config
    from dreamprm.runlog import wandb_mode

    cfg = Config()
    cfg.run.wandb_mode = "offline"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode(cfg) == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(cfg) == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg.run.wandb_mode = "auto"
    assert wandb_mode(cfg) == "offline"


def test_wandb_offline_is_quiet(tmp_path, capfd, monkeypatch):
    from dreamprm.config import Config
    from dreamprm.runlog import start_wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = Config()
    cfg.run.wandb_mode = "offline"
    run = start_wandb(cfg, tmp_path, 0)
    run.log({"loss": 1.0}, step=1)
    run.finish()
    out = capfd.readouterr()
    assert out.out + out.err == ""
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def _log(cfg, tmp_path, tty: bool, monkeypatch):
    import sys

    from dreamprm.runlog import RunLog

    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    cfg.run.disable_wandb = True
    return RunLog(cfg, tmp_path, 0, ["a"], 0, {"last_checkpoint": None}, lambda: None)


def test_a_log_gets_a_progress_line_after_the_first_update_whatever_log_every(tmp_path, capsys, monkeypatch):
    from dreamprm.config import Config

    cfg = Config()
    cfg.run.log_every, cfg.train.total_steps = 50, 200
    log = _log(cfg, tmp_path, False, monkeypatch)
    out = {"loss": 0.5, "loss_unweighted": 0.5, "tokens": 100}
    for step in (1, 2):
        log.update(out, None)
        log.tick(out, step)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("update 1/200  loss 0.5000  meta loss -  tokens/s ")
    assert not (tmp_path / "metrics.jsonl").exists()  # metrics rows stay every log_every updates
    log.close()


def test_the_bar_is_closed_before_the_end_of_run_lines(tmp_path, monkeypatch):
    from dreamprm.config import Config

    log = _log(Config(), tmp_path, True, monkeypatch)
    bar, order = log.bar, []
    monkeypatch.setattr(bar, "close", lambda: order.append("bar closed"))
    monkeypatch.setattr("dreamprm.runlog.print0", lambda *a, **k: order.append("line"))
    log.summary(torch.zeros(1, 3, dtype=torch.float64), object(), 0)
    assert order[0] == "bar closed" and order.count("line") == 2
    log.close()
    assert order.count("bar closed") == 1
