"""`dreamprm data check` and `dreamprm data convert`, called through dreamprm.cli.main."""

import errno
import gzip
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dreamprm import cli
from dreamprm.cli import main
from dreamprm.data.record import Record
from records import read_records

REPO = Path(__file__).resolve().parents[1]

TRL_ROWS = [{"id": "a", "prompt": "1+1?", "completions": ["1+1=2", "so 2"], "labels": [1, 0.5], "domain": "math"},
            {"id": "b", "prompt": "2+2?", "completions": ["2+2=5"], "labels": [0]}]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_check_summary(tmp_path, capsys):
    f = write(tmp_path / "t.jsonl", TRL_ROWS)
    assert main(["data", "check", str(f)]) == 0
    out = capsys.readouterr().out
    assert "records: 2" in out
    assert "steps: 3 (mean 1.5, max 2 per record)" in out
    assert "labels: correct (>=0.5) 2, wrong (<0.5) 1, unlabelled 0, soft (0<y<1) 1" in out
    assert "domains: (none) 1, math 1" in out

    assert main(["data", "check", str(f), "--from", "trl", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["records"] == 2 and s["outcomes"]["none"] == 2


def test_check_reports_every_problem(tmp_path, capsys):
    f = write(tmp_path / "t.jsonl", TRL_ROWS + [{"prompt": "p", "completions": ["x"], "labels": [3]},
                                                {"prompt": "p", "completions": ["<extra_0>"], "labels": [1]}])
    assert main(["data", "check", str(f)]) == 1
    err = capsys.readouterr().err
    assert f"{f}:3: labels[0]: 3.0 is not a number in [0, 1]" in err
    assert f"{f}:4: steps[0]: contains the step tag" in err
    assert "2 problem(s)" in err and "--skip-invalid" in err

    assert main(["data", "check", str(f), "--step-tag", "<step>"]) == 1  # the tag is only the flag's
    assert f"{f}:4:" not in capsys.readouterr().err

    assert main(["data", "check", str(f), "--skip-invalid"]) == 0
    assert "records: 2" in capsys.readouterr().out


def test_check_with_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<extra_0>", "1+1?", "1+1=2", "so", "2", "2+2?", "2+2=5"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    t.add_special_tokens({"additional_special_tokens": ["<extra_0>"]})
    t.save_pretrained(tmp_path / "tok")
    f = write(tmp_path / "t.jsonl", TRL_ROWS)
    assert main(["data", "check", str(f), "--tokenizer", str(tmp_path / "tok"), "--json"]) == 0
    # a: 1 + (1+1) + (2+1) = 6 tokens, b: 1 + (1+1) = 3
    s = json.loads(capsys.readouterr().out)
    assert s["tokens"] == {"mean": 4.5, "p10": 6, "p25": 6, "p50": 6, "p75": 6, "p90": 6, "p95": 6, "p99": 6,
                           "max": 6}
    assert s["buckets"]["1-128"] == 2 and "cut" not in s
    # max_length 4: b whole, a cut after its first step (1 + 2 = 3 tokens); 3: a and b keep one step; 2: both dropped
    for n, cut in ((4, (1, 1, 0, 1)), (3, (1, 1, 0, 1)), (2, (0, 0, 2, 3))):
        assert main(["data", "check", str(f), "--tokenizer", str(tmp_path / "tok"), "--max_length", str(n),
                     "--json"]) == 0
        c = json.loads(capsys.readouterr().out)["cut"]
        assert (c["whole"], c["truncated"], c["dropped"], c["steps_cut"]) == cut, n
    assert main(["data", "check", str(f), "--tokenizer", str(tmp_path / "tok"), "--max_length", "4"]) == 0
    assert "max_length 4: 1 whole, 1 truncated at a step boundary, 0 dropped" in capsys.readouterr().out
    assert main(["data", "check", str(f), "--max_length", "4"]) == 1
    assert "--max_length: counts tokens, so it needs --tokenizer" in capsys.readouterr().err

    assert main(["data", "check", str(f), "--tokenizer", str(tmp_path / "nope")]) == 1
    assert "--tokenizer: " in capsys.readouterr().err


def test_convert_roundtrip(tmp_path, capsys):
    pb = [{"id": "math-0", "generator": "g", "problem": "P", "steps": ["a", "b"], "final_answer_correct": False,
           "label": 1}]
    src = tmp_path / "math.json"
    src.write_text(json.dumps(pb))
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", "--from", "processbench", str(src), str(out)]) == 0
    assert f"wrote 1 records to {out}" in capsys.readouterr().out
    original, _ = read_records(src, "processbench")
    converted, problems = read_records(out, "dreamprm")
    assert problems == [] and converted == original
    assert converted[0].labels == [1.0, 0.0] and converted[0].domain == "math"


def test_convert_failures(tmp_path, capsys):
    bad = write(tmp_path / "t.jsonl", TRL_ROWS + [{"prompt": "p", "completions": [], "labels": []}])
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(bad), str(out)]) == 1
    assert f"{bad}:3: steps: must be a non-empty list" in capsys.readouterr().err
    assert not out.exists()
    assert main(["data", "convert", "--skip-invalid", str(bad), str(out)]) == 0
    assert "wrote 2 records" in capsys.readouterr().out
    assert main(["data", "convert", str(bad), str(bad)]) == 1
    assert "OUT: is the input file" in capsys.readouterr().err
    assert main(["data", "convert", str(tmp_path / "missing.jsonl"), str(out)]) == 1
    err = capsys.readouterr().err
    assert "missing.jsonl: no such file" in err and "--skip-invalid" not in err


def test_bad_flags_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "check", "x.jsonl", "--from", "nope"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main([])


def test_check_pretty_printed_object_says_so_once(tmp_path, capsys):
    f = tmp_path / "records.json"
    f.write_text(json.dumps({"data": TRL_ROWS * 50}, indent=2))  # ~500 lines
    assert main(["data", "check", str(f)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[1] == "1 problem(s)"
    assert "is one JSON object spread over several lines" in err[0] and "'data' list of 100" in err[0]
    assert "invalid JSON" not in err[0]


# ---------------------------------------------------------------------------- bad input: one message, no traceback

GOOD = {"id": "a", "question": "q", "steps": ["s"], "labels": [1]}
ROW = '{"id": "a", "question": "q", "steps": ["s"], "labels": [1]'  # without its closing brace


def _make(kind, p: Path) -> None:
    rows = {"deep": ROW + ', "meta": ' + "[" * 5000 + "]" * 5000 + "}",
            "digits": ROW + ', "meta": ' + "9" * 5000 + "}",
            "surrogate": ROW.replace('"q"', '"q \\ud800"') + "}",
            "numeric step": ROW.replace('["s"]', '[7]') + "}",
            "null id": ROW.replace('"a"', "null") + "}",
            "list id": ROW.replace('"a"', "[1, 2]") + "}",
            "float schema": ROW + ', "schema": 1.0}',
            "duplicate key": ROW + ', "labels": [0]}'}
    if kind in rows:
        p.write_text(rows[kind] + "\n")
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "directory":
        p.mkdir()
    elif kind == "symlink loop":
        p.symlink_to(p.name)
    else:
        p.write_bytes({"empty": b"", "blank": b"\n \n", "gzip": gzip.compress(b"{}\n"),
                       "utf-16": (json.dumps(GOOD) + "\n").encode("utf-16")}[kind])


CASES = {"deep": ":1: line: JSON nested too deeply", "digits": ":1: line: an integer has more than 4300 digits",
         "surrogate": ":1: question: lone surrogate \\ud800",
         "numeric step": ":1: steps[0]: expected a string, got int 7",
         "null id": ":1: id: expected a string or an integer, got null",
         "list id": ":1: id: expected a string or an integer, got list [1, 2]",
         "float schema": ":1: schema: expected an integer (this dreamprm reads 1), got float 1.0",
         "duplicate key": ":1: line: duplicate key 'labels'", "empty": ": is empty (no records)",
         "blank": ": is empty: its 2 line(s) are blank", "gzip": ": is gzip-compressed",
         "utf-16": ": is UTF-16 text (byte-order mark)", "fifo": ": is a named pipe (FIFO), not a data file",
         "directory": ": is a directory, not a data file", "symlink loop": ": is a symbolic link loop"}


@pytest.mark.parametrize("kind", list(CASES))
def test_check_bad_input_one_message_no_traceback(tmp_path, kind):
    f = tmp_path / "data.jsonl"
    _make(kind, f)
    # a subprocess: a traceback shows as it would to a user, and a hang (a FIFO opened) hits the timeout
    p = subprocess.run([sys.executable, "-m", "dreamprm.cli", "data", "check", str(f)], capture_output=True,
                       text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.splitlines()[0].startswith(str(f) + CASES[kind]), p.stderr
    assert p.stderr.splitlines()[1:] in (["1 problem(s)"], ["1 problem(s); fix them, or pass --skip-invalid to leave "
                                                             "the bad records out"]), p.stderr


def test_convert_unencodable_record_leaves_no_file(tmp_path, capsys, monkeypatch):
    # The reader rejects lone surrogates now; records from elsewhere (here: patched in) can still hold one.
    # Convert used to die with a traceback and leave a short OUT that `data check` passed.
    src = write(tmp_path / "t.jsonl", TRL_ROWS)
    recs, _ = read_records(src)
    recs.insert(1, Record("bad", "q", ["half \ud800"], [1.0]))
    monkeypatch.setattr(cli, "load_records", lambda *a, **k: recs)
    out = tmp_path / "out.jsonl"
    assert main(["data", "convert", str(src), str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[0] == (
        f"{out}: record 2 (id 'bad') cannot be written as UTF-8 JSON: a string holds a lone surrogate (surrogates "
        "not allowed); fix or drop it; nothing was written")
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl"]  # no OUT, no temp file
    out.write_text("old\n")
    assert main(["data", "convert", str(src), str(out)]) == 1
    assert out.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["out.jsonl", "t.jsonl"]


def test_convert_disk_full_leaves_no_file(tmp_path, capsys, monkeypatch):
    src = write(tmp_path / "t.jsonl", TRL_ROWS)
    out = tmp_path / "out.jsonl"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    assert main(["data", "convert", str(src), str(out)]) == 1
    assert capsys.readouterr().err == f"OUT: cannot write {out}: disk full\n"
    assert sorted(os.listdir(tmp_path)) == ["t.jsonl"]


def test_convert_output_mode_and_bad_out(tmp_path, capsys):
    src = write(tmp_path / "t.jsonl", TRL_ROWS)
    out = tmp_path / "out.jsonl"
    old = os.umask(0o022)
    try:
        assert main(["data", "convert", str(src), str(out)]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # not a temp file's 0600
    assert [r.id for r in read_records(out)[0]] == ["a", "b"]
    capsys.readouterr()
    assert main(["data", "convert", str(src), str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"OUT: {tmp_path} is a directory; name the output file")
    assert main(["data", "convert", str(src), str(tmp_path / "no" / "out.jsonl")]) == 1
    assert capsys.readouterr().err == (f"OUT: cannot write {tmp_path / 'no' / 'out.jsonl'}: the folder "
                                       f"{tmp_path / 'no'} does not exist\n")
    loop = tmp_path / "loop"
    loop.symlink_to("loop")  # Path.resolve raised RuntimeError on it before the input was even read
    assert main(["data", "convert", str(loop), str(out)]) == 1
    assert capsys.readouterr().err.startswith(f"{loop}: is a symbolic link loop")
