"""dreamprm/data/sources.py: a run's data checks that need the records and their encoding (batch sizes
against the data per rank, the curriculum's difficulties, meta records that are training records)."""

import json

import pytest

from dreamprm.config import Config
from dreamprm.data.sources import read_run_records, run_data
from dreamprm.errors import DataError
from dreamprm.model import training_tokenizer


def write(path, n, prefix, meta=None, outcome=1.0):
    rows = [{"schema": 1, "id": f"{prefix}{i}", "question": f"{prefix} question {i}", "steps": ["a step", "b step"],
             "labels": [1.0, 0.0], "outcome": outcome, **({"meta": meta(i)} if meta else {})} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def config(train, meta, **kw) -> Config:
    cfg = Config()
    cfg.data.train_file, cfg.data.meta_file = str(train), str(meta)
    cfg.data.train_format = cfg.data.meta_format = "dreamprm"
    for k, v in kw.items():
        for sec in (cfg.data, cfg.train, cfg.meta):
            if hasattr(sec, k):
                setattr(sec, k, v)
    return cfg


def data(cfg, world=1, meta=None):
    """run_data on the config's files; meta(i) replaces the i-th training record's meta (whatever the readers
    let through: run_data must not trust it)."""
    records = read_run_records(cfg, needs_meta=True)
    for i, r in enumerate(records[0][0] if meta else []):
        r.meta = meta(i)
    return run_data(cfg, training_tokenizer(cfg.model), 0, needs_meta=True, world=world, records=records)


@pytest.mark.parametrize("kw,world,says", [
    ({"batch_size": 4}, 1, "--batch_size 4: more than the 3 usable examples per rank of --train_file"),
    ({"batch_size": 2}, 2, "--batch_size 2: more than the 1 usable examples per rank of --train_file"),
    ({"meta_batch_size": 5}, 1, "--meta_batch_size 5: more than the 4 usable examples per rank of --meta_file")])
def test_a_batch_larger_than_the_data_per_rank_is_an_error_naming_the_flag_and_counts(tmp_path, kw, world, says):
    cfg = config(write(tmp_path / "t.jsonl", 3, "t"), write(tmp_path / "m.jsonl", 4, "m"), **kw)
    with pytest.raises(DataError) as e:
        data(cfg, world)
    assert any(p.startswith(says) for p in e.value.problems), e.value.problems


def test_meta_records_that_are_training_records_get_a_warning_with_the_count(tmp_path, capsys):
    train = write(tmp_path / "t.jsonl", 4, "t")
    data(config(train, write(tmp_path / "m.jsonl", 3, "m")))
    assert "identical to training examples" not in capsys.readouterr().out
    data(config(train, train))
    assert "warning: 4 of 4 meta examples are identical to training examples" in capsys.readouterr().out


@pytest.mark.parametrize("meta,says", [(lambda i: "hard", "record 1 (id 't0'): meta is str"),
                                       (lambda i: [i], "record 1 (id 't0'): meta is list"),
                                       (lambda i: {"difficulty": float("nan") if i == 1 else i},
                                        "1 records have none (record 2 (id 't1'): meta.difficulty is nan"),
                                       (lambda i: {"difficulty": 10 ** 400 if i == 2 else i},
                                        "record 3 (id 't2'): meta.difficulty is 1000"),
                                       (lambda i: {"difficulty": "easy"}, "meta.difficulty is easy")])
def test_a_difficulty_that_is_not_a_finite_number_is_named_not_a_traceback(tmp_path, meta, says):
    cfg = config(write(tmp_path / "t.jsonl", 3, "t"), write(tmp_path / "m.jsonl", 3, "m"),
                 curriculum="difficulty", mix="size")
    with pytest.raises(DataError) as e:
        data(cfg, meta=meta)
    assert any("--curriculum difficulty needs a finite number in meta.difficulty" in p and says in p
               for p in e.value.problems), e.value.problems
