"""Readers: every format on small inline files, every kind of bad input reported with
FILE:LINE and the field in one run, auto-detection, and the real files under ../shared."""

import bz2
import gzip
import json
import logging
import math
from pathlib import Path

import pytest

from dreamprm.data.readers import (
    MAX_LEAN_STEPS,
    DataError,
    detect_format,
    lean_steps,
    load_records,
    summary,
)
from dreamprm.data.record import Record, write_jsonl
from records import read_records

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "realdata"


def jsonl(path: Path, rows) -> Path:
    """Write rows (dicts, or raw str lines) as JSONL."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def at(problems, line):
    """The messages reported for one line, without the FILE:LINE prefix."""
    return [p.split(f":{line}: ", 1)[1] for p in problems if f":{line}: " in p]


# ---------------------------------------------------------------------------- dreamprm

def test_dreamprm_roundtrip(tmp_path):
    recs = [Record("a", "q?", ["s1", "s2"], [1.0, None], outcome=0.0, domain="math", meta={"group": 3}),
            Record("b", "q2", ["only"], [0.25])]
    write_jsonl(recs, tmp_path / "d.jsonl")
    got, problems = read_records(tmp_path / "d.jsonl", "dreamprm")
    assert problems == [] and got == recs


def test_dreamprm_schema_and_missing_fields(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{"schema": 9, "id": "a", "question": "q", "steps": ["s"]},
                                     {"id": "b", "labels": [1]}])
    _, problems = read_records(f, "dreamprm")
    assert at(problems, 1) == ["schema: 9 is not supported (this dreamprm reads 1)"]
    assert at(problems, 2) == ["question: missing", "steps: missing"]


def test_dreamprm_schema_must_be_the_integer(tmp_path):
    base = {"id": "a", "question": "q", "steps": ["s"], "labels": [1]}
    f = jsonl(tmp_path / "d.jsonl", [{**base, "schema": v} for v in (1.0, True, "1", None)] + [{**base, "schema": 1}])
    recs, problems = read_records(f, "dreamprm")
    assert [r.id for r in recs] == ["a"] and len(problems) == 4
    for line, kind in ((1, "float 1.0"), (2, "bool True"), (3, "str '1'"), (4, "null")):
        assert at(problems, line) == [f"schema: expected an integer (this dreamprm reads 1), got {kind}"]


def test_dreamprm_ids_null_list_or_object_are_rejected(tmp_path):
    # an integer id stays accepted as its string (as before); null, lists, objects, booleans and
    # floats were turned into "None", "[1, 2]", ... and are errors now
    base = {"question": "q", "steps": ["s"], "labels": [1]}
    f = jsonl(tmp_path / "d.jsonl", [{**base, "id": v} for v in (None, [1, 2], {"a": 1}, True, 1.5, 7, "x")])
    recs, problems = read_records(f, "dreamprm")
    assert [r.id for r in recs] == ["7", "x"]
    for line, kind in ((1, "null"), (2, "list [1, 2]"), (3, "dict {'a': 1}"), (4, "bool True"), (5, "float 1.5")):
        assert at(problems, line) == [f"id: expected a string or an integer, got {kind}"]


@pytest.mark.parametrize("fmt,row,key", [
    ("trl", {"prompt": "p", "completions": ["a"], "labels": [1]}, "id"),
    ("math_shepherd", {"input": "Q Step 1: a ки", "label": "Q Step 1: a +"}, "id"),
    ("minif2f", {"formal_statement": "t", "cot_response": "### Step 1\nx", "cot_steps": [{"pi": 1}]}, "id"),
    ("mr_gsm8k", {"question": "q", "model_output_steps": ["a"], "model_output_solution_correctness": "correct"},
     "uuid"),
])
def test_optional_ids_typed_in_every_format(tmp_path, fmt, row, key):
    # absent or null: the FILE:LINE default; 0 is an id (it used to fall back to the default); a list is an error
    f = jsonl(tmp_path / "d.jsonl", [row, {**row, key: None}, {**row, key: 0}, {**row, key: [1, 2]}])
    recs, problems = read_records(f, fmt)
    assert [r.id for r in recs] == ["d.jsonl:1", "d.jsonl:2", "0"]
    assert at(problems, 4) == [f"{key}: expected a string or an integer, got list '[1, 2]'"]


# ---------------------------------------------------------------------------- minif2f

def minif2f_row(**kw):
    row = {"name": "thm1", "informal_prefix": "/-- Show 1+1=2. -/\n", "formal_statement": "theorem t : 1 + 1 = 2 := by",
           "cot_response": "### Step 1: Analyze\nLook at it.\n### Step 2\nnorm_num\n### Step 3: Done", "meta_label": 1,
           "cot_steps": [{"pi": 0.8}, {"pi": 1}, {"pi": 0.25}]}
    row.update(kw)
    return row


def test_minif2f(tmp_path):
    row = minif2f_row()
    del row["name"]
    f = jsonl(tmp_path / "m.jsonl", [minif2f_row(), row])
    recs, problems = read_records(f, "minif2f")
    assert problems == []
    r = recs[0]
    assert r.id == "thm1" and recs[1].id == "m.jsonl:2"
    assert r.steps == ["Analyze\nLook at it.", "norm_num", "Done"]
    assert r.labels == [0.8, 1.0, 0.25] and r.outcome == 1.0
    assert r.question == "/-- Show 1+1=2. -/\ntheorem t : 1 + 1 = 2 := by"


def test_minif2f_problems_all_reported(tmp_path):
    f = jsonl(tmp_path / "m.jsonl", [
        minif2f_row(cot_response="Intro text.\n### Step 1: a\n### Step 2: b\n### Step 3: c"),
        minif2f_row(cot_steps=[{"pi": 0.5}]),
        minif2f_row(cot_steps=[{"pi": 1.5}, {"pi": "x"}, {"p": 1}]),
        minif2f_row(cot_response="### Step 1: a\n### Step 3: b\n### Step 4: c"),
        minif2f_row(cot_response="no headers"),
        {"cot_steps": []},
    ])
    _, problems = read_records(f, "minif2f")
    assert at(problems, 1) == ["cot_response: text before ### Step 1"]
    assert at(problems, 2) == ["cot_steps: 1 entries for 3 steps in cot_response"]
    assert [m.split(":")[0] for m in at(problems, 3)] == ["cot_steps[0].pi", "cot_steps[1].pi", "cot_steps[2].pi"]
    assert at(problems, 4) == ["cot_response: step headers numbered [1, 3, 4], expected 1..3"]
    assert at(problems, 5) == ["cot_response: no '### Step k' headers found"]
    assert at(problems, 6) == ["cot_response: missing",
                               "formal_statement: missing (with informal_prefix it forms the question)"]


# ---------------------------------------------------------------------------- trl

def test_trl_and_every_bad_input_in_one_run(tmp_path):
    good = {"prompt": "2+2?", "completions": ["2+2=4", "so 4"], "labels": [True, 1]}
    f = jsonl(tmp_path / "t.jsonl", [
        good,                                                                        # 1
        '{"prompt": "x", "completions": [',                                          # 2 malformed JSON
        "",                                                                          # blank: ignored
        {"prompt": "p", "completions": ["a", "b"], "labels": [1]},                   # 4 count mismatch
        '{"prompt": "p", "completions": ["a"], "labels": [NaN]}',                    # 5 NaN label
        {"prompt": "p", "completions": ["a", "b"], "labels": [2, -0.5]},             # 6 out of range
        {"prompt": "p", "completions": ["a", "  "], "labels": [1, 0]},               # 7 empty step
        {"prompt": "p", "completions": ["a<extra_0>b"], "labels": [1]},              # 8 tag in a step
        {"completions": "a", "labels": [1]},                                         # 9 missing / wrong type
        {"id": "dup", "prompt": "p", "completions": ["a"], "labels": [0]},           # 10
        {"id": "dup", "prompt": "p", "completions": ["a"], "labels": [0]},           # 11 duplicate id
        "[1, 2]",                                                                    # 12 not an object
        "null",                                                                      # 13 not an object
        {"prompt": "what is 2+2?<extra_0>", "completions": ["a"], "labels": [1]},    # 14 tag in the question
    ])
    with open(f, "ab") as fh:
        fh.write(b'{"prompt": "caf\xe9", "completions": ["a"], "labels": [1]}\n')  # 15 Latin-1 byte
    recs, problems = read_records(f, "trl")
    assert [r.id for r in recs] == ["t.jsonl:1", "dup"]
    assert recs[0].labels == [1.0, 1.0] and recs[0].question == "2+2?"
    assert at(problems, 2)[0].startswith("line: invalid JSON")
    assert at(problems, 4) == ["labels: 1 labels for 2 steps (need one per step)"]
    assert at(problems, 5) == ["labels[0]: nan is not a number in [0, 1]"]
    assert at(problems, 6) == ["labels[0]: 2.0 is not a number in [0, 1]", "labels[1]: -0.5 is not a number in [0, 1]"]
    assert at(problems, 7) == ["steps[1]: empty step"]
    assert at(problems, 8)[0].startswith("steps[0]: contains the step tag '<extra_0>'")
    assert at(problems, 9) == ["prompt: missing", "completions: expected a list, got str 'a'"]
    assert at(problems, 11) == ["id: duplicate id 'dup' (first at line 10)"]
    assert at(problems, 12) == ["line: expected a JSON object, got list"]
    assert at(problems, 13) == ["line: expected a JSON object, got NoneType"]
    assert at(problems, 14) == ["question: contains the step tag '<extra_0>' (steps would be misplaced); remove it "
                                "from the text or train with another --step_tag"]
    assert at(problems, 15)[0].startswith("line: not valid UTF-8 (byte 0xe9 at column 16)")
    assert all(p.startswith(f"{f}:") for p in problems)
    assert len(problems) == 14


# ---------------------------------------------------------------------------- math_shepherd

def test_math_shepherd_positions(tmp_path):
    q = "Tom has 16 - 3 + 2 apples. How many? "
    inp = q + "Step 1: 16 - 3 = 13 ки\nStep 2: 13 + 2 = 15. The answer is: 15 ки"
    f = jsonl(tmp_path / "ms.jsonl", [
        {"input": inp, "label": q + "Step 1: 16 - 3 = 13 +\nStep 2: 13 + 2 = 15. The answer is: 15 -", "task": "GSM8K"},
        {"input": inp, "label": q + "Step 1: 16 - 3 = 13 +\nStep 2: 13 + 2 = 15. The answer is: 15 ?"},
        {"input": "no tags here", "label": "no tags here"},
        {"input": "Q? Step 1: a ки trailing", "label": "Q? Step 1: a + trailing"},
    ])
    recs, problems = read_records(f, "math_shepherd")
    r = recs[0]
    assert r.question == "Tom has 16 - 3 + 2 apples. How many?"
    assert r.steps == ["Step 1: 16 - 3 = 13", "Step 2: 13 + 2 = 15. The answer is: 15"]
    assert r.labels == [1.0, 0.0] and r.domain == "GSM8K"
    assert at(problems, 2)[0].startswith("label: does not match input at step 2")
    assert at(problems, 3) == ["input: no 'ки' step tags"]
    assert at(problems, 4) == ["input: text after the last 'ки' tag: 'trailing'"]


# ---------------------------------------------------------------------------- processbench

def pb(i, label, n=3, correct=False, problem="P?"):
    return {"id": f"gsm8k-{i}", "generator": "g", "problem": problem, "steps": [f"s{k}" for k in range(n)],
            "final_answer_correct": correct, "label": label}


def test_processbench_labels_domain_and_lines(tmp_path):
    f = tmp_path / "gsm8k.json"
    f.write_text(json.dumps([pb(0, -1, correct=True), pb(1, 0), pb(2, 1, n=4, problem="Q?")], indent=2))
    recs, problems = read_records(f, "processbench")
    assert problems == []
    assert [r.labels for r in recs] == [[1.0, 1.0, 1.0], [0.0, None, None], [1.0, 0.0, None, None]]
    assert [r.outcome for r in recs] == [1.0, 0.0, 0.0]
    assert {r.domain for r in recs} == {"gsm8k"}
    assert recs[0].meta["group"] == recs[1].meta["group"] != recs[2].meta["group"]
    assert [r.meta["first_error"] for r in recs] == [-1, 0, 1]


def test_processbench_bad_elements_name_their_line(tmp_path):
    f = tmp_path / "math.json"
    rows = [pb(0, -1), pb(1, 3), pb(2, -2), {"id": "x"}, "not an object"]
    f.write_text(json.dumps(rows, indent=2))
    text = f.read_text().split("\n")
    starts = [n for n, ln in enumerate(text, 1) if ln in ("  {", '  "not an object"')]
    _, problems = read_records(f, "processbench")
    assert at(problems, starts[1]) == ["label: 3 is not a step index for 3 steps (use -1 for all correct)"]
    assert at(problems, starts[2]) == ["label: -2 is not a step index for 3 steps (use -1 for all correct)"]
    assert at(problems, starts[3]) == ["problem: missing", "steps: missing", "label: missing",
                                       "final_answer_correct: missing"]
    assert at(problems, starts[4]) == ["[4]: expected a JSON object, got str"]


def test_truncated_json_array_is_fatal_even_when_skipping(tmp_path):
    f = tmp_path / "omnimath.json"
    f.write_text(json.dumps([pb(0, -1), pb(1, 0)], indent=2)[:-40])
    recs, problems = read_records(f, "processbench")
    assert len(recs) == 1 and "the rest of the array was not read" in problems[0]
    with pytest.raises(DataError):
        load_records(f, "processbench", skip_invalid=True)


# ---------------------------------------------------------------------------- prm800k

def comp(text, rating):
    return {"text": text, "rating": rating, "flagged": False}


def prm800k_row(steps, finish="found_error"):
    return {"labeler": "x", "question": {"problem": "What is 1+1?", "ground_truth_answer": "2"},
            "label": {"steps": steps, "finish_reason": finish}}


def test_prm800k_mapping(tmp_path):
    steps = [
        {"completions": [comp("a good", 1)], "human_completion": None, "chosen_completion": 0},
        {"completions": [comp("b neutral", 0), comp("b alt", 1)], "human_completion": None, "chosen_completion": 0},
        {"completions": [comp("c bad", -1)], "human_completion": {"text": "c human", "rating": None},
         "chosen_completion": None},
        {"completions": [comp("d ok", 1), comp("d wrong", -1), comp("d wrong2", -1)], "human_completion": None,
         "chosen_completion": None},
        {"completions": [comp("never reached", 1)], "human_completion": None, "chosen_completion": 0},
    ]
    give_up = steps[:2] + [{"completions": None, "human_completion": None, "chosen_completion": None}]
    f = jsonl(tmp_path / "p.jsonl", [prm800k_row(steps), prm800k_row(give_up, "give_up"),
                                     prm800k_row([{"completions": [comp("x", 5)], "chosen_completion": 0}]),
                                     prm800k_row([{"completions": [comp("x", 1)], "chosen_completion": 3}]),
                                     {"question": {}, "label": {"steps": []}}])
    recs, problems = read_records(f, "prm800k")
    r = recs[0]
    assert r.steps == ["a good", "b neutral", "c human", "d wrong"]
    assert r.labels == [1.0, 1.0, 1.0, 0.0] and r.outcome is None
    assert r.meta["finish_reason"] == "found_error" and r.meta["ground_truth_answer"] == "2"
    assert recs[1].steps == ["a good", "b neutral"] and recs[1].labels == [1.0, 1.0]
    assert at(problems, 3) == ["label.steps[0]: rating 5 is not -1, 0, 1 or null"]
    assert at(problems, 4) == ["label.steps[0].chosen_completion: 3 is not an index into 1 completions"]
    assert at(problems, 5) == ["question.problem: missing"]


# ---------------------------------------------------------------------------- minif2f_attempts

def test_lean_steps_structure():
    completion = ("/-\n  Informal proof sketch.\n  -/\n  -- First substitute.\n  rw [h₂, h₃] at h₁\n"
                  "  have h : x = 1 := by\n    -- inner comment\n    simp\n\n  norm_num at h₁ ⊢\n  <;> linarith\n"
                  "  -- trailing comment\n```\nSome prose after the fence.\n  rw [nope]")
    assert lean_steps(completion) == [
        "/-\nInformal proof sketch.\n-/\n-- First substitute.\nrw [h₂, h₃] at h₁",
        "have h : x = 1 := by\n  -- inner comment\n  simp",
        "norm_num at h₁ ⊢\n<;> linarith\n-- trailing comment",
    ]


def test_lean_steps_first_line_and_column_zero():
    # a deeper-indented continuation of the first line stays with it (top level is at most 2)
    assert lean_steps("nlinarith [sq_nonneg (a - b),\n    sq_nonneg (a + b)]") == [
        "nlinarith [sq_nonneg (a - b),\n  sq_nonneg (a + b)]"]
    # a code line at column 0 ends the proof; </think> ends it too
    assert lean_steps("simp\n  ring\n\ntheorem other : True := by\n  trivial") == ["simp", "ring"]
    assert lean_steps("omega\n</think>\n```lean4\ntheorem t := by\n  omega\n```") == ["omega"]
    assert lean_steps("-- only a comment\n```") == [] and lean_steps("") == []


def test_lean_steps_cap():
    steps = lean_steps("\n".join(f"  tac{k}" for k in range(100)).lstrip())
    assert len(steps) == MAX_LEAN_STEPS
    assert steps[-2] == "tac62" and steps[-1] == "\n".join(f"tac{k}" for k in range(63, 100))


def test_minif2f_attempts(tmp_path):
    row = {"problem_idx": 0, "name": "mathd_algebra_478", "model": "m/P", "attempt": 3, "passed": True,
           "completion": "subst h₂\n  norm_num at h₁ ⊢\n```"}
    f = jsonl(tmp_path / "a.jsonl", [row, dict(row, attempt=4, passed=False, completion="```\nprose"),
                                     dict(row, attempt=5, passed="yes"),
                                     dict(row, attempt=6, completion="simp\n  exact h�"),
                                     dict(row, attempt=7, completion="  \n")])
    recs, problems = read_records(f, "minif2f_attempts")
    r = recs[0]
    assert r.id == "mathd_algebra_478/m/P/3" and r.question == "mathd_algebra_478"
    assert r.steps == ["subst h₂", "norm_num at h₁ ⊢"] and r.labels == [None, None]
    assert r.outcome == 1.0 and r.domain == "m/P" and r.meta["group"] == "mathd_algebra_478"
    # prose without a tactic is a real failed attempt: one step holding its text
    assert recs[1].steps == ["```\nprose"] and recs[1].meta["no_tactics"] and recs[1].outcome == 0.0
    assert recs[2].steps == ["simp", "exact h"]  # the cut character is dropped
    assert at(problems, 3) == ["passed: expected true or false, got str 'yes'"]
    assert at(problems, 5) == ["completion: empty"]


def test_minif2f_attempts_statement_as_question(tmp_path):
    row = {"name": "t1", "model": "m", "attempt": 1, "passed": True, "completion": "simp",
           "informal_prefix": "/-- Show it. -/\n", "formal_statement": "theorem t1 : 1 = 1 := by\n"}
    f = jsonl(tmp_path / "a.jsonl", [row, {k: v for k, v in row.items() if k != "informal_prefix"} | {"attempt": 2}])
    recs, problems = read_records(f, "minif2f_attempts")
    assert problems == []
    assert recs[0].question == "/-- Show it. -/\ntheorem t1 : 1 = 1 := by"
    assert recs[1].question == "theorem t1 : 1 = 1 := by"


# ---------------------------------------------------------------------------- mr_gsm8k, prmbench

def mr_row(**kw):
    row = {"uuid": "u1", "question": "Q?", "model_output_steps": ["Step 1: a", "Step 2: b", "Step 3: c"],
           "model_output_answer_correctness": "wrong", "model_output_solution_correctness": "wrong",
           "model_output_solution_first_error_step": 2, "question_type": "reversed"}
    row.update(kw)
    return row


def test_mr_gsm8k(tmp_path):
    f = jsonl(tmp_path / "mr.jsonl", [
        mr_row(), mr_row(uuid="u2", model_output_solution_correctness="correct",
                         model_output_answer_correctness="correct", model_output_solution_first_error_step=None),
        mr_row(uuid="u3", model_output_solution_first_error_step=4),
        mr_row(uuid="u4", model_output_solution_correctness="maybe")])
    recs, problems = read_records(f, "mr_gsm8k")
    assert recs[0].id == "u1" and recs[0].steps[0] == "Step 1: a" and recs[0].question == "Q?"
    assert recs[0].labels == [1.0, 0.0, None] and recs[0].outcome == 0.0 and recs[0].domain == "reversed"
    assert recs[0].meta["first_error"] == 1
    assert recs[1].labels == [1.0, 1.0, 1.0] and recs[1].outcome == 1.0 and recs[1].meta["first_error"] == -1
    assert at(problems, 3) == ["model_output_solution_first_error_step: 4 is not a step number for 3 steps (1-based)"]
    assert at(problems, 4) == ["model_output_solution_correctness: expected 'correct' or 'wrong', got 'maybe'"]


def pmb_row(**kw):
    row = {"original_question": "Q0", "modified_question": "Q1", "question": "Q0 latex",
           "original_process": ["a", "b", "c"], "modified_process": ["a", "B", "C"],
           "modified_steps": [2, 3], "error_steps": [2, 3], "reason": "r", "idx": "p_0",
           "classification": "circular"}
    row.update(kw)
    return row


def test_prmbench(tmp_path):
    f = jsonl(tmp_path / "pb.jsonl", [pmb_row(), pmb_row(classification="confidence", error_steps=[]),
                                      pmb_row(classification="deception", error_steps=[2, 4])])
    recs, problems = read_records(f, "prmbench")
    assert [r.id for r in recs] == ["circular/p_0", "confidence/p_0"]  # idx repeats across error types
    assert recs[0].question == "Q1" and recs[0].steps == ["a", "B", "C"]
    assert recs[0].labels == [1.0, 0.0, 0.0] and recs[0].outcome is None and recs[0].domain == "circular"
    assert recs[1].labels == [1.0, 1.0, 1.0] and recs[0].meta["group"] == recs[1].meta["group"] == "p_0"
    assert at(problems, 3) == ["error_steps: [4] are not step numbers 1..3"]


def test_pretty_printed_object_is_one_clear_problem(tmp_path):
    f = tmp_path / "obj.json"
    f.write_text(json.dumps({"version": 1, "records": [SAMPLES["trl"]] * 3}, indent=2))
    for fmt in ("auto", "trl"):
        recs, problems = read_records(f, fmt)
        assert recs == [] and len(problems) == 1
        assert "is one JSON object spread over several lines" in problems[0]
        assert "its 'records' list of 3 objects may be the records" in problems[0]
    with pytest.raises(DataError) as e:
        load_records(f, skip_invalid=True)
    assert len(e.value.problems) == 1
    # a one-line object is JSONL with one record, and a bad first line of a JSONL file stays per line
    f.write_text(json.dumps(SAMPLES["trl"]) + "\n")
    assert len(load_records(f)) == 1
    f.write_text("{oops\n" + json.dumps(SAMPLES["trl"]) + "\n")
    assert at(read_records(f)[1], 1)[0].startswith("line: invalid JSON")


# ---------------------------------------------------------------------------- gsm8k_candidates

def test_gsm8k_candidates(tmp_path):
    row = {"question": "Q?", "ground_truth": "x\nA: 18",
           "6b": {"is_correct": False, "solution": "a = <<1+1=2>>2\n\nA: 2"},
           "175b": {"is_correct": True, "solution": "b\n#### 18"}}
    f = jsonl(tmp_path / "g.jsonl", [row, {"question": "Q2", "6b": {"solution": "x"}}])
    recs, problems = read_records(f, "gsm8k_candidates")
    assert [r.id for r in recs] == ["0/6b", "0/175b"]
    assert recs[0].steps == ["a = <<1+1=2>>2", "A: 2"] and recs[0].outcome == 0.0 and recs[1].outcome == 1.0
    assert [r.meta for r in recs] == [{"group": 0, "answer": "2"}, {"group": 0, "answer": "18"}]
    assert recs[0].domain == "6b" and recs[0].labels == [None, None]
    assert at(problems, 2) == ["6b.is_correct: missing"]


# ---------------------------------------------------------------------------- auto, load_records, summary


# ---------------------------------------------------------------------------- what json lets through

GOOD = {"id": "a", "question": "q", "steps": ["s"], "labels": [1]}


def raw_row(**fields) -> str:
    """A dreamprm row as text with some fields written raw (JSON text that json.dumps would not make)."""
    return "{" + ", ".join(f'"{k}": {v}' for k, v in {**{k: json.dumps(v) for k, v in GOOD.items()},
                                                        **fields}.items()) + "}"


def test_deep_nesting_is_a_line_problem_not_a_recursion_error(tmp_path):
    deep = "[" * 5000 + "]" * 5000
    f = jsonl(tmp_path / "d.jsonl", [GOOD, raw_row(id='"b"', meta='{"x": ' + deep + "}")])
    recs, problems = read_records(f)
    assert [r.id for r in recs] == ["a"]
    assert at(problems, 2) == ["line: JSON nested too deeply (Python's parser stops near 1000 levels); "
                               "flatten the record"]
    arr = tmp_path / "a.json"
    arr.write_text("[" + json.dumps(GOOD) + ",\n" + raw_row(id='"b"', meta=deep) + "]")
    recs, problems = read_records(arr)
    assert [r.id for r in recs] == ["a"] and len(problems) == 1
    assert problems[0].startswith(f"{arr}:2: [1]: JSON nested too deeply") and "rest of the array" in problems[0]


def test_integer_past_the_digit_limit_is_a_line_problem(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [raw_row(meta='{"n": ' + "7" * 5000 + "}"), raw_row(id='"b"', labels="[1e999]")])
    recs, problems = read_records(f)
    assert recs == [] and len(problems) == 2
    assert at(problems, 1) == ["line: an integer has more than 4300 digits (Python's limit for reading integers); "
                               "write it as a string or a float"]
    assert at(problems, 2) == ["labels[0]: inf is not a number in [0, 1]"]  # a float overflows to inf: named


def test_lone_surrogates_are_rejected_where_they_are(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [raw_row(question=r'"q \ud800"'), raw_row(id='"b"', steps=r'["ok", "x\udc00"]'),
                                     raw_row(id='"c"', meta=r'{"src": {"why": ["\udbff"]}}'),
                                     raw_row(id='"d"', meta=r'{"k\ud800": 1}'),
                                     raw_row(id='"e"', steps=r'["pair \ud83d\ude00"]'),
                                     raw_row(id='"f"', steps=r'["escaped \\ud800 text"]')])
    recs, problems = read_records(f)
    assert [(r.id, r.steps) for r in recs] == [("e", ["pair \U0001F600"]), ("f", ["escaped \\ud800 text"])]
    fix = ("(half of a UTF-16 pair, not a character: it cannot be encoded as UTF-8 or tokenized); fix that \\u "
           "escape in the file")
    assert at(problems, 1) == [f"question: lone surrogate \\ud800 at character 3 {fix}"]
    assert at(problems, 2) == [f"steps[1]: lone surrogate \\udc00 at character 2 {fix}"]
    assert at(problems, 3) == [f"meta.src.why[0]: lone surrogate \\udbff at character 1 {fix}"]
    assert at(problems, 4) == [f"meta: key 'k\\ud800': lone surrogate \\ud800 at character 2 {fix}"]
    # the TRL reader (every format) gets the same check, before its own fields are looked at
    t = jsonl(tmp_path / "t.jsonl", ['{"prompt": "p", "completions": ["\\ud800"], "labels": [1]}'])
    assert at(read_records(t, "trl")[1], 1) == [f"completions[0]: lone surrogate \\ud800 at character 1 {fix}"]


def test_numeric_step_is_named_not_called_empty(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{**GOOD, "steps": [3, "b", None, ["x"]], "labels": [1, 1, 1, 1]}])
    assert at(read_records(f)[1], 1) == ["steps[0]: expected a string, got int 3",
                                         "steps[2]: expected a string, got null",
                                         "steps[3]: expected a string, got list ['x']"]
    t = jsonl(tmp_path / "t.jsonl", [{"prompt": "p", "completions": [2.5], "labels": [1]}])
    assert at(read_records(t, "trl")[1], 1) == ["steps[0]: expected a string, got float 2.5"]


def test_duplicate_keys_are_a_line_problem(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", ['{"id": "a", "question": "q", "steps": ["s"], "labels": [1], "labels": [0]}',
                                     raw_row(id='"b"', meta='{"g": 1, "g": 2}'), raw_row(id='"c"')])
    recs, problems = read_records(f)
    assert [r.id for r in recs] == ["c"]
    keep = "in one JSON object (a JSON reader keeps only the last value); keep one"
    assert at(problems, 1) == [f"line: duplicate key 'labels' {keep}"]
    assert at(problems, 2) == [f"line: duplicate key 'g' {keep}"]
    arr = tmp_path / "a.json"
    arr.write_text("[\n" + json.dumps(GOOD) + ",\n" + raw_row(id='"b"', id2='"x"').replace('"id2"', '"id"') + "\n]")
    recs, problems = read_records(arr)
    assert [r.id for r in recs] == ["a"] and problems == [f"{arr}:3: [1]: duplicate key 'id' {keep}"]


def test_meta_must_be_an_object(tmp_path):
    f = jsonl(tmp_path / "d.jsonl", [{**GOOD, "meta": "x"}, {**GOOD, "id": "b", "meta": None}])
    recs, problems = read_records(f)
    assert [(r.id, r.meta) for r in recs] == [("b", {})]
    assert at(problems, 1) == ["meta: expected an object or null, got str 'x'"]


# ---------------------------------------------------------------------------- whole files, named once

def _link(target):
    def make(p):
        p.symlink_to(target if target != "self" else p.name)
    return make


WHOLE_FILE = {
    "empty": (lambda p: p.write_bytes(b""), "is empty (no records); pass a file with one JSON record per line"),
    "blank": (lambda p: p.write_bytes(b"\n  \n\t\n"), "is empty: its 3 line(s) are blank (no records)"),
    "bom only": (lambda p: p.write_bytes(b"\xef\xbb\xbf\n"), "is empty: its 1 line(s) are blank"),
    "gzip": (lambda p: p.write_bytes(gzip.compress(b'{"id": "a"}\n' * 50)),
             "is gzip-compressed, not UTF-8 JSON text; decompress it first (gunzip -k FILE)"),
    "bz2": (lambda p: p.write_bytes(bz2.compress(b'{"id": "a"}\n' * 50)),
            "is bzip2-compressed, not UTF-8 JSON text; decompress it first (bunzip2 -k FILE)"),
    "utf-16": (lambda p: p.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16") * 20),
               "is UTF-16 text (byte-order mark), not UTF-8 JSON text; re-encode it as UTF-8 (iconv -f UTF-16"),
    "utf-16-be": (lambda p: p.write_bytes(b"\xfe\xff" + (json.dumps(GOOD) + "\n").encode("utf-16-be")),
                  "is UTF-16 text (byte-order mark)"),
    "utf-16 no bom": (lambda p: p.write_bytes((json.dumps(GOOD) + "\n").encode("utf-16-le") * 20),
                      ":1: holds NUL bytes: UTF-16 text without a byte-order mark, or not a text file"),
    "directory": (lambda p: (p.mkdir(), (p / "train.jsonl").write_text("{}")),
                  "is a directory, not a data file; pass one JSONL or JSON file (it holds train.jsonl)"),
    "symlink loop": (_link("self"), "is a symbolic link loop (it leads back to itself)"),
    "dangling symlink": (_link("nowhere.jsonl"), "is a symbolic link to nowhere.jsonl, which does not exist"),
    "missing": (lambda p: None, "no such file"),
    "empty array": (lambda p: p.write_text(" [ ]\n"), "is an empty JSON array (no records)"),
}


@pytest.mark.parametrize("fmt", ["auto", "dreamprm"])
@pytest.mark.parametrize("case", list(WHOLE_FILE))
def test_whole_file_problem_is_named_once(tmp_path, case, fmt):
    # (a FIFO, which `data check` used to hang on, is tests/test_cli_data.py's: a subprocess with a timeout)
    make, words = WHOLE_FILE[case]
    f = tmp_path / "data.jsonl"
    make(f)
    with pytest.raises(DataError) as e:
        load_records(f, fmt, skip_invalid=True)  # whole-file problems are never skippable
    assert len(e.value.problems) == 1 and not e.value.skippable, e.value.problems
    assert e.value.problems[0].startswith(str(f)) and words in e.value.problems[0], e.value.problems
    assert "pass --from" not in e.value.problems[0]

SAMPLES = {
    "dreamprm": {"schema": 1, "id": "a", "question": "q", "steps": ["s"], "labels": [1]},
    "minif2f": minif2f_row(),
    "trl": {"prompt": "p", "completions": ["a"], "labels": [1]},
    "math_shepherd": {"input": "Q Step 1: a ки", "label": "Q Step 1: a +"},
    "prm800k": prm800k_row([{"completions": [comp("a", 1)], "human_completion": None, "chosen_completion": 0}]),
    "minif2f_attempts": {"name": "t", "model": "m", "attempt": 1, "passed": False, "completion": "simp"},
    "gsm8k_candidates": {"question": "q", "m": {"is_correct": True, "solution": "a\nA: 1"}},
    "mr_gsm8k": mr_row(),
    "prmbench": pmb_row(),
}


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_auto_detect_jsonl(tmp_path, fmt):
    f = jsonl(tmp_path / "x.jsonl", [SAMPLES[fmt]])
    assert detect_format(f) == fmt
    assert len(load_records(f)) == 1


def test_auto_detect_json_array(tmp_path):
    f = tmp_path / "olympiadbench.json"
    f.write_text(json.dumps([pb(0, -1)]))
    assert detect_format(f) == "processbench"
    assert load_records(f)[0].domain == "olympiadbench"


def test_auto_detect_fails_clearly(tmp_path):
    both = jsonl(tmp_path / "both.jsonl", [{**SAMPLES["trl"], "cot_response": "### Step 1: a"}])
    with pytest.raises(DataError, match="matches minif2f, trl; pass --from"):
        load_records(both)
    unknown = jsonl(tmp_path / "unknown.jsonl", [{"text": "hello"}])
    with pytest.raises(DataError, match="matches no known format"):
        load_records(unknown)
    with pytest.raises(DataError, match="missing.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl", "trl", skip_invalid=True)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_records(tmp_path / "empty.jsonl", "trl")


def test_load_records_caps_message_and_skips(tmp_path, caplog):
    bad = {"prompt": "p", "completions": ["a"], "labels": [7]}
    f = jsonl(tmp_path / "t.jsonl", [SAMPLES["trl"]] + [bad] * 60)
    with pytest.raises(DataError) as e:
        load_records(f, "trl")
    assert len(e.value.problems) == 60 and e.value.skippable
    assert str(e.value).endswith("... and 10 more") and f"{f}:61: labels[0]" in e.value.problems[-1]
    with caplog.at_level(logging.WARNING):
        recs = load_records(f, "trl", skip_invalid=True)
    assert len(recs) == 1
    assert f"skipped 60 invalid records in {f}: lines 2, 3, 4" in caplog.text
    only_bad = jsonl(tmp_path / "bad.jsonl", [bad])
    with pytest.raises(DataError) as e:  # nothing valid left: skipping would hide a broken file
        load_records(only_bad, "trl", skip_invalid=True)
    assert not e.value.skippable


def test_summary_counts():
    recs = [Record("a", "q", ["x", "y", "z"], [1.0, 0.0, None], outcome=1.0, domain="d1"),
            Record("b", "q", ["x"], [0.7], domain=None)]
    s = summary(recs)
    assert s["records"] == 2 and s["steps"] == {"total": 4, "mean": 2.0, "max": 3}
    assert s["labels"] == {"correct (>=0.5)": 2, "wrong (<0.5)": 1, "unlabelled": 1, "soft (0<y<1)": 1}
    assert s["outcomes"] == {"correct (>=0.5)": 1, "wrong (<0.5)": 0, "none": 1}
    assert s["domains"] == {"(none)": 1, "d1": 1}
    assert summary([])["records"] == 0


def test_summary_token_lengths():
    class CharTokenizer:  # one token per character
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [list(t) for t in texts]}

    recs = [Record("a", "qq", ["xyz", "w"], [1.0, 1.0]), Record("b", "q", ["x"], [1.0])]
    # question + each step + one tag token per step
    # lengths 2+(3+1)+(1+1) = 8 and 1+(1+1) = 3; percentiles take the higher observed length
    assert summary(recs, CharTokenizer())["tokens"] == {"mean": 5.5, "p50": 8, "p95": 8, "max": 8}


# ---------------------------------------------------------------------------- real data

def real(sub: str) -> Path:
    path = REAL / sub
    if not path.exists():
        pytest.skip(f"real data not available: {path} (the shared/ folder next to the repository)")
    return path


@pytest.mark.parametrize("split,n,all_correct", [("gsm8k", 400, 193), ("math", 1000, 406),
                                                 ("olympiadbench", 1000, 339), ("omnimath", 1000, 241)])
def test_real_processbench(split, n, all_correct):
    recs, problems = read_records(real(f"processbench/{split}.json"))
    assert problems == [] and len(recs) == n
    assert sum(all(y == 1.0 for y in r.labels) for r in recs) == all_correct  # SOURCE.txt stats
    assert sum(r.outcome for r in recs) == n / 2
    for r in recs:
        k = r.meta["first_error"]
        if k >= 0:
            assert r.labels[:k] == [1.0] * k and r.labels[k] == 0.0 and set(r.labels[k + 1:]) <= {None}
    if split == "gsm8k":
        by_id = {r.id: r for r in recs}
        assert by_id["gsm8k-0"].labels == [1.0, 0.0, None, None] and by_id["gsm8k-0"].outcome == 0.0
        assert by_id["gsm8k-3"].labels == [1.0, 1.0, 0.0, None]


def test_real_math_shepherd_and_prm800k():
    recs, problems = read_records(real("openr_prm_format_samples/samples_math-shepherd.jsonl"))
    assert problems == [] and len(recs) == 7
    assert recs[0].labels == [1.0, 1.0, 1.0, 1.0, 0.0] and recs[0].steps[0].startswith("Step 1: Janet spends")
    assert recs[0].question.endswith("than clarinet lessons in a year?")
    recs, problems = read_records(real("openr_prm_format_samples/samples_prm800k.jsonl"))
    assert problems == [] and len(recs) == 6
    found_error = [r for r in recs if r.meta["finish_reason"] == "found_error"]
    assert len(found_error) == 1 and found_error[0].labels[-1] == 0.0


@pytest.mark.parametrize("prover", ["goedel_prover_sft", "deepseek_prover_v2_7b", "kimina_prover_distill_7b"])
def test_real_minif2f_attempts(prover):
    path = real(f"minif2f_prover_attempts_passfail/{prover}_attempts.jsonl")
    n_rows = len(path.read_text(encoding="utf-8").splitlines())
    recs, problems = read_records(path)
    bad_rows = {p.split(": ")[0] for p in problems}
    assert len(recs) + len(bad_rows) == n_rows
    assert len(bad_rows) <= 0.005 * n_rows  # nearly every attempt yields valid steps
    assert all(len(r.steps) <= MAX_LEAN_STEPS and all(s.strip() for s in r.steps) for r in recs)
    assert {r.outcome for r in recs} == {0.0, 1.0}


def test_real_gsm8k_candidates():
    recs, problems = read_records(real("gsm8k_openai_model_solutions/example_model_solutions.jsonl"))
    assert problems == [] and len(recs) == 1319 * 4
    assert recs[0].meta["group"] == recs[3].meta["group"] == 0 and recs[4].meta["group"] == 1
    assert sum(r.meta["answer"] is not None for r in recs) > 0.99 * len(recs)
    assert not any(math.isnan(r.outcome) for r in recs)


def test_real_mr_gsm8k():
    recs, problems = read_records(real("mr_gsm8k_first_error/mr_gsm8k_wrong_solutions.jsonl"))
    assert problems == [] and len(recs) == 590  # SOURCE.txt: 590 rows, all graded wrong
    for r in recs:
        k = r.meta["first_error"]
        assert r.labels[:k] == [1.0] * k and r.labels[k] == 0.0 and set(r.labels[k + 1:]) <= {None}
    assert sum(r.outcome for r in recs) == 19  # right answer, wrong solution (8 + 9 + 2 rows)
    assert {r.domain for r in recs} == {"original", "reversed", "POT"}


def test_real_prmbench():
    path = real("prmbench_subset/prmbench_subset400.jsonl")
    recs, problems = read_records(path)
    # 11 rows name an error step past their last step: reported, the other 383 read
    assert len(recs) == 383 and len(problems) == 11
    assert all("error_steps:" in p for p in problems)
    multi = [r for r in recs if r.domain == "multi_solutions"]
    assert len(multi) == 10 and all(set(r.labels) == {1.0} for r in multi)
    assert all(0.0 in r.labels for r in recs if r.domain != "multi_solutions")
