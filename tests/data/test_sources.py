"""dreamprm/data/sources.py, --weights_from: the fixed weight of every training record from an earlier run's
instance_weights.jsonl, by id or (a domain_table run's) by domain, and each mismatch named. The training runs
that use them are in tests/test_train.py."""

import json

import pytest
import yaml

from dreamprm.config import Config, Source
from dreamprm.data.record import Record
from dreamprm.data.sources import record_weights
from dreamprm.errors import WeightsError


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
