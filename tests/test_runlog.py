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
