import math

import pytest

from dreamprm.config import DEFAULT_STEP_TAG as TAG
from dreamprm.data.record import Record
from dreamprm.errors import ModelError
from dreamprm.data.tokenize import (
    PROFILES,
    Profile,
    check_step_tag,
    domain_table,
    encode_records,
    prompt_text,
)


def rec(corpus, id="r0", steps=None, labels=None, question=None, outcome=None, domain=None):
    """Question corpus[0] with steps corpus[1:5]: texts every test tokenizer knows."""
    steps = corpus[1:5] if steps is None else steps
    labels = [1.0, 0.5, None, 0.0][:len(steps)] if labels is None else labels
    return Record(id=id, question=corpus[0] if question is None else question, steps=list(steps),
                  labels=labels, outcome=outcome, domain=domain)


def step_text(tok, ids):
    # The byte-level BPE decodes exactly; the word-level one joins words with one space.
    return tok.decode(ids).strip()


def test_check_step_tag_accepts_one_token(good_tok):
    tid = check_step_tag(good_tok, TAG)
    assert good_tok.encode(TAG, add_special_tokens=False) == [tid]


def test_check_step_tag_rejects_split_tag(split_tag_tok):
    with pytest.raises(ModelError, match=r"not one token of the tokenizer \w+\(in memory\).*--add_step_tag"):
        check_step_tag(split_tag_tok, TAG)


def test_check_step_tag_rejects_tag_that_merges_with_text(merging_tag_tok, corpus):
    # One token on its own (so a naive check passes) but "x<extra_0>" has no tag token.
    assert len(merging_tag_tok.encode(TAG, add_special_tokens=False)) == 1
    with pytest.raises(ModelError, match=r"merges with neighbouring text.*'x<extra_0>' encodes to"):
        check_step_tag(merging_tag_tok, TAG)
    with pytest.raises(ModelError, match="merges"):
        encode_records([rec(corpus)], merging_tag_tok, TAG, 512, False)


@pytest.mark.parametrize("chat", [True, False])
def test_labels_land_on_the_tag_after_each_step(good_tok, chat, corpus):
    tid = check_step_tag(good_tok, TAG)
    steps = corpus[1:5]
    (ex,), st = encode_records([rec(corpus, outcome=1.0)], good_tok, TAG, 512, chat)
    assert st.n_kept == 1 and st.n_truncated == st.n_dropped == 0
    assert ex.n_steps == ex.n_kept == len(ex.tag_pos) == len(ex.labels) == 4
    assert all(ex.input_ids[p] == tid for p in ex.tag_pos)
    assert ex.input_ids.count(tid) == 4 and ex.input_ids[-1] == tid
    starts = [ex.tag_pos[0] - len(good_tok.encode(steps[0], add_special_tokens=False))] + \
        [p + 1 for p in ex.tag_pos[:-1]]
    for k, (a, b) in enumerate(zip(starts, ex.tag_pos)):
        assert step_text(good_tok, ex.input_ids[a:b]) == steps[k]
    assert ex.labels[:2] == [1.0, 0.5] and math.isnan(ex.labels[2]) and ex.labels[3] == 0.0
    assert ex.outcome == 1.0 and ex.index == 0 and ex.domain == 0 and ex.id == "r0"
    prompt = ex.input_ids[:starts[0]]
    if good_tok.bos_token_id is not None:  # word-level: one BOS at the start, none in the steps
        assert prompt[0] == good_tok.bos_token_id and ex.input_ids.count(good_tok.bos_token_id) == 1
    else:
        assert good_tok.decode(prompt) == prompt_text(corpus[0], good_tok, chat)


def test_chat_template_prompt(bpe_tok, word_tok, corpus):
    text = prompt_text(corpus[0], bpe_tok, True)
    assert text.startswith("<|im_start|>system\nPlease reason step by step")
    assert corpus[0] in text and text.endswith("<|im_start|>assistant\n")
    assert prompt_text(corpus[0], bpe_tok, False) == corpus[0] + "\n"
    assert prompt_text(corpus[0], word_tok, True) == corpus[0] + "\n"  # no template: plain form


def test_profiles_render_the_question(bpe_tok, corpus):
    q = corpus[0]
    assert prompt_text(q, bpe_tok, True, PROFILES["default"]) == prompt_text(q, bpe_tok, True)  # unchanged default
    assert prompt_text(q, bpe_tok, True, PROFILES["plain"]) == q + "\n"
    assert prompt_text(q, bpe_tok, True, PROFILES["problem_solution"]) == f"Problem: {q}\nSolution:\n"
    custom = Profile("custom", chat=True, system="", template="Prove $\\{x\\}$: {question}")
    text = prompt_text(q, bpe_tok, True, custom)
    assert "system" not in text and f"<|im_start|>user\nProve $\\{{x\\}}$: {q}<|im_end|>" in text  # braces kept
    assert prompt_text(q, bpe_tok, False, custom) == f"Prove $\\{{x\\}}$: {q}\n"  # --no-chat_template wins
    with_sys = prompt_text(q, bpe_tok, True, Profile("s", system="Be brief."))
    assert with_sys.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    ex_default, _ = encode_records([rec(corpus)], bpe_tok, TAG, 256, True)
    ex_plain, _ = encode_records([rec(corpus)], bpe_tok, TAG, 256, True, profile=PROFILES["plain"])
    assert ex_plain[0].input_ids != ex_default[0].input_ids and ex_plain[0].labels == ex_default[0].labels


def encode_one(record, tok, max_length, chat):
    """One record encoded alone (None when it is dropped)."""
    exs, _ = encode_records([record], tok, TAG, max_length, chat)
    return exs[0] if exs else None


def test_truncation_keeps_whole_steps(good_tok, corpus):
    tid = check_step_tag(good_tok, TAG)
    full = encode_one(rec(corpus), good_tok, 10_000, False)
    for max_len, kept in [(full.tag_pos[1] + 1, 2), (full.tag_pos[2], 2), (full.tag_pos[0] + 1, 1),
                          (len(full.input_ids), 4)]:
        (ex,), st = encode_records([rec(corpus)], good_tok, TAG, max_len, False)
        assert ex.n_kept == kept and ex.n_steps == 4 and len(ex.input_ids) <= max_len
        assert ex.input_ids == full.input_ids[:full.tag_pos[kept - 1] + 1]
        assert ex.tag_pos == full.tag_pos[:kept] and len(ex.labels) == kept
        assert all(ex.input_ids[p] == tid for p in ex.tag_pos) and ex.input_ids.count(tid) == kept
        assert st.n_truncated == (kept < 4) and st.steps_dropped == 4 - kept


def test_first_step_too_long_drops_and_counts(good_tok, corpus):
    full = encode_one(rec(corpus), good_tok, 10_000, False)
    long_first = rec(corpus, "long", steps=[" ".join(corpus[1:8])] + corpus[2:5])
    recs = [rec(corpus, "a"), long_first, rec(corpus, "b")]
    exs, st = encode_records(recs, good_tok, TAG, full.tag_pos[0] + 1, False)
    assert [e.id for e in exs] == ["a", "b"] and [e.index for e in exs] == [0, 1]  # dense index
    assert st.n_records == 3 and st.n_kept == 2 and st.n_dropped == 1 and st.dropped_ids == ["long"]
    assert st.n_truncated == 2 and st.steps_total == 12 and st.steps_dropped == 3 + 3 + 4
    assert "dropped ids: long" in str(st)
    assert encode_one(long_first, good_tok, full.tag_pos[0] + 1, False) is None


def test_domain_indexing(bpe_tok, corpus):
    recs = [rec(corpus, "x", domain="geo"), rec(corpus, "y"), rec(corpus, "z", domain="alg")]
    exs, st = encode_records(recs, bpe_tok, TAG, 512, False)
    assert st.domains == ["<none>", "alg", "geo"] and [e.domain for e in exs] == [2, 0, 1]
    exs, st = encode_records(recs, bpe_tok, TAG, 512, False, domains=["num", "geo", "alg"])
    assert st.domains == domain_table(["alg", "geo", "num"]) and [e.domain for e in exs] == [2, 0, 1]
    with pytest.raises(ValueError, match="'geo'.*not in the domain table"):
        encode_records(recs, bpe_tok, TAG, 512, False, domains=["alg"])


def test_invalid_records_reported_together(bpe_tok, corpus):
    bad = [rec(corpus, "a", labels=[1.0]), rec(corpus, "c"),
           rec(corpus, "b", steps=["ok", "has " + TAG + " inside"], labels=[1, 1])]
    with pytest.raises(ValueError, match="2 problems") as e:
        encode_records(bad, bpe_tok, TAG, 512, False)
    assert "'a': labels" in str(e.value) and "'b': steps[1]" in str(e.value)


def test_tag_in_question_fails_loudly(bpe_tok, corpus):
    # Record validation names it (readers report it as FILE:LINE at read time, tests/data/test_readers.py).
    with pytest.raises(ValueError, match="record 'q': question: contains the step tag"):
        encode_records([rec(corpus, "q", question="Is " + TAG + " a tag?")], bpe_tok, TAG, 512, False)


def test_lone_surrogate_and_numeric_step_are_record_problems(bpe_tok, corpus):
    # A lone surrogate used to pass `data check` and crash the tokenizer mid-run; a number as a step
    # was called "empty step". Both are named per record before the tokenizer sees any text.
    bad = [rec(corpus, "s", steps=["ok", "half \ud800 pair"], labels=[1, 1]),
           rec(corpus, "q", question="q \udfff"), rec(corpus, "n", steps=[3, "ok"], labels=[1, 1])]
    with pytest.raises(ValueError, match="3 problems") as e:
        encode_records(bad, bpe_tok, TAG, 512, False)
    msg = str(e.value)
    assert "record 's': steps[1]: lone surrogate \\ud800 at character 6" in msg
    assert "record 'q': question: lone surrogate \\udfff" in msg
    assert "record 'n': steps[0]: expected a string, got int 3" in msg
    ok, _ = encode_records([rec(corpus, "e", steps=["emoji \U0001F600"], labels=[1])], bpe_tok, TAG, 512, False)
    assert len(ok) == 1  # a real (paired) astral character is fine


def test_a_byte_level_single_token_tag_is_one_token():
    """TRL's "\\n" is one token of a byte-level BPE (spelt "Ċ"): the check says so instead of "not one token"
    (the config refuses newline tags for their own reason: test_config)."""
    from dreamprm.tiny import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    (nl,) = tok.encode("\n", add_special_tokens=False)
    assert tok.convert_tokens_to_ids("\n") != nl  # what the check used to compare with
    assert check_step_tag(tok, "\n") == nl
