"""`dreamprm data check` and `dreamprm data convert`, called through dreamprm.cli.main."""

import json

import pytest

from dreamprm.cli import main
from dreamprm.data.readers import read_records

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
