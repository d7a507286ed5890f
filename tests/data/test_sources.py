"""dreamprm/data/sources.py: a run's data checks that need the records and their encoding (batch sizes
against the data per rank, the curriculum's difficulties, meta records that are training records), and
--weights_from: the fixed weight of every training record from an earlier run's instance_weights.jsonl, by id
or (a domain_table run's) by domain, and each mismatch named. The training runs that use them are in
tests/test_train.py."""

import json

import pytest
import yaml

from dreamprm import checkpoint as ck
from dreamprm.config import Config, Source
from dreamprm.data.record import Record
from dreamprm.data.sources import read_run_records, record_weights, run_data
from dreamprm.errors import DataError, WeightsError
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


def rec(rid, domain=None):
    return Record(id=rid, question="q", steps=["s"], labels=[1.0], domain=domain)


def learned_run(tmp_path, rows, kind="instance_table", train_file="proxy.jsonl", name="proxy"):
    run = tmp_path / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"train_file": str(tmp_path / train_file)}, "model": {},
                                                     "meta": {"baseline": False, "weights": kind}}))
    (run / "instance_weights.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def cfg_for(run, unmatched="error"):
    cfg = Config()
    cfg.meta.weights_from, cfg.meta.unmatched_weight = str(run), unmatched
    return cfg


def rows(pairs, domain="d"):
    return [{"id": i, "index": k, "domain": domain, "weight": w} for k, (i, w) in enumerate(pairs)]


SRC = [Source("--train_file", "target.jsonl", "target", "auto", None)]


def test_records_get_their_learned_weight_by_id_whatever_the_order(tmp_path):
    run = learned_run(tmp_path, rows([("a", 0.5), ("b", 1.5), ("c", 1.0)]))
    got, notes = record_weights(cfg_for(run), SRC, [[rec("c"), rec("a"), rec("b")]])
    assert got == [{"a": 0.5, "b": 1.5, "c": 1.0}]
    assert "matched by record id" in notes[0]
    assert any("learned on" in n and "proxy.jsonl" in n and "target.jsonl" in n for n in notes)  # other file named


def test_rows_of_records_this_run_lacks_are_refused_naming_both_runs_files(tmp_path):
    run = learned_run(tmp_path, rows([("a", 0.5), ("zz", 1.5)]))
    with pytest.raises(WeightsError) as e:
        record_weights(cfg_for(run, "one"), SRC, [[rec("a")]])
    msg = str(e.value)
    assert "1 of 2 rows" in msg and "'zz' (line 2)" in msg and "proxy.jsonl" in msg and "target.jsonl" in msg


def test_records_without_a_learned_weight_are_counted_and_need_a_choice(tmp_path):
    run = learned_run(tmp_path, rows([("a", 0.5), ("b", 1.5)]) + [{"id": "c", "index": 2, "domain": "d",
                                                                   "weight": None}])
    recs = [[rec("a", "d"), rec("b", "d"), rec("c", "d"), rec("e", "d")]]
    with pytest.raises(WeightsError, match=r"2 of 4 training records have no learned weight: 'c' \(target\), "
                                           r"'e' \(target\).*--unmatched_weight domain_mean"):
        record_weights(cfg_for(run), SRC, recs)
    assert record_weights(cfg_for(run, "one"), SRC, recs)[0] == [{"a": 0.5, "b": 1.5, "c": 1.0, "e": 1.0}]
    got, notes = record_weights(cfg_for(run, "domain_mean"), SRC, recs)
    assert got == [{"a": 0.5, "b": 1.5, "c": 1.0, "e": 1.0}]  # the mean of domain d's learned weights
    assert any("2 training records without a learned weight get --unmatched_weight domain_mean" in n for n in notes)


def test_domain_mean_needs_a_learned_record_in_the_domain(tmp_path):
    run = learned_run(tmp_path, rows([("a", 0.5)]))
    with pytest.raises(WeightsError, match=r"domain\(s\) 'other' have no record with a learned weight"):
        record_weights(cfg_for(run, "domain_mean"), SRC, [[rec("a", "d"), rec("x", "other")]])


def test_rows_that_name_a_source_match_only_that_source(tmp_path):
    two = SRC + [Source("--train_file", "more.jsonl", "more", "auto", "more")]
    run = learned_run(tmp_path, [{"id": "a", "index": 0, "domain": None, "weight": 0.5, "source": "more"},
                                 {"id": "a", "index": 1, "domain": None, "weight": 2.0, "source": "target"}])
    got, _ = record_weights(cfg_for(run), two, [[rec("a")], [rec("a")]])
    assert got == [{"a": 2.0}, {"a": 0.5}]
    ambiguous = learned_run(tmp_path, rows([("a", 0.5)]), name="no_source")  # rows of today's trainer
    with pytest.raises(WeightsError, match="their id is in several training sources"):
        record_weights(cfg_for(ambiguous, "one"), two, [[rec("a")], [rec("a")]])


def test_a_domain_table_transfers_by_domain_name_to_a_larger_dataset(tmp_path):
    run = learned_run(tmp_path, rows([("a", 1.4)], "clean") + [{"id": "b", "index": 1, "domain": "noisy",
                                                                "weight": 0.6}], kind="domain_table")
    big = [[rec(f"c{i}", "clean") for i in range(5)] + [rec(f"n{i}", "noisy") for i in range(3)]]
    got, notes = record_weights(cfg_for(run), SRC, big)
    assert got == [{**{f"c{i}": 1.4 for i in range(5)}, **{f"n{i}": 0.6 for i in range(3)}}]
    assert "matched by domain (2 learned domains)" in notes[0]
    unseen = [big[0] + [rec("m", "math"), rec("m2", "math")]]
    with pytest.raises(WeightsError, match=r"domain\(s\) 'math' \(2 records\) were never seen.*'clean', 'noisy'"):
        record_weights(cfg_for(run), SRC, unseen)
    assert record_weights(cfg_for(run, "one"), SRC, unseen)[0][0]["m"] == 1.0


def test_a_source_domain_overrides_the_records_own(tmp_path):
    run = learned_run(tmp_path, rows([("a", 0.7)], "noisy"), kind="domain_table")
    src = [Source("--train_file", "t.jsonl", "t", "auto", "noisy")]
    assert record_weights(cfg_for(run), src, [[rec("x", "clean")]])[0] == [{"x": 0.7}]


def test_a_bare_weights_file_matches_by_id(tmp_path):
    f = tmp_path / "w.jsonl"
    f.write_text(json.dumps({"id": "a", "index": 0, "domain": None, "weight": 0.25}) + "\n")
    got, notes = record_weights(cfg_for(f), SRC, [[rec("a")]])
    assert got == [{"a": 0.25}] and "matched by record id" in notes[0]


def test_weights_its_run_set_aside_are_refused_and_the_step_is_named(tmp_path):
    """After a resume that fell back to step 20, the proxy's file still holds the weights of the step 40 it set
    aside (until its next save): they would be fixed for the whole run, so they are refused."""
    run = learned_run(tmp_path, [])
    root = run / "checkpoints"
    for step, parent in ((20, None), (40, ck.tag(20))):
        (root / ck.tag(step)).mkdir(parents=True)
        ck.write_manifest(root / ck.tag(step), step, 1, 0, parent, {})
    at = {"step": 40, "manifest": ck.manifest_id(root / ck.tag(40))}
    (run / "instance_weights.jsonl").write_text(json.dumps(rows([("a", 0.5)])[0] | at) + "\n")
    got, notes = record_weights(cfg_for(run), SRC, [[rec("a")]])
    assert got == [{"a": 0.5}] and "as of step 40 (checkpoint step_00000040)" in notes[0]
    (run / "status.json").write_text(json.dumps({"state": "running", "last_checkpoint": str(root / ck.tag(20))}))
    with pytest.raises(WeightsError, match=r"--weights_from .*proxy: .*holds the weights of step_00000040, but the "
                                           r"run's newest intact checkpoint is step_00000020.*copy the file out"):
        record_weights(cfg_for(run), SRC, [[rec("a")]])
