"""Records -> token ids with the step tag positions known exactly (Qwen2.5-Math-PRM layout).

Text of an example = prompt(question) + step_1 + TAG + step_2 + TAG + ...  The ids are built
piece by piece (prompt, then each step encoded alone followed by the tag id) so a tag can
never merge with its neighbours and the label of step k sits on the k-th tag. Every example
is checked for that before it is returned (OpenRLHF issue 683: a merged tag silently left
the model with no supervised position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dreamprm.data.record import Record, record_problems
from dreamprm.errors import ModelError

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
QUESTION = "{question}"  # where a profile's template puts the question
NO_DOMAIN = "<none>"  # name of domain index 0: records without a domain

# Text around the tag in check_step_tag: a tag that is one token alone but merges with a
# neighbour ("x<tag>") would break tag-position lookup on whole-text encodings at inference.
# Real steps end in digits, "$", "\\]", "." and newlines (ProcessBench), and a step follows a tag.
_PROBES = ("x{}", "{}x", "1.{}", " {} ", "\n{}\n", "a {}b", "12{}", "$x$.{}", "\\]{}", "\n\n{}", "{}Step",
           "{}{}")


@dataclass
class Example:
    input_ids: list[int]
    tag_pos: list[int]  # position of the tag after each kept step
    labels: list[float]  # one per kept step; nan = unlabelled
    outcome: float  # nan when the record has none
    index: int  # dense position among the kept examples of the dataset (instance-weight id)
    domain: int  # index into domain_table(...): 0 = no domain
    n_steps: int  # steps in the record
    n_kept: int  # steps kept after truncation (>= 1)
    id: str = ""  # record id, to report and to map scores back to records


@dataclass
class EncodeStats:
    n_records: int = 0
    n_kept: int = 0  # examples returned
    n_truncated: int = 0  # returned with fewer steps than the record had
    n_dropped: int = 0  # not even the prompt + first step fits in max_length
    dropped_ids: list[str] = field(default_factory=list)
    steps_total: int = 0
    steps_dropped: int = 0  # steps cut by truncation, dropped examples included
    labelled_steps: int = 0  # kept steps with a label
    domains: list[str] = field(default_factory=list)  # the domain table the indices point into
    max_length: int = 0
    full_len_max: int = 0  # longest untruncated example, in tokens
    len_mean: float = 0.0  # of the returned examples
    len_max: int = 0

    def __str__(self) -> str:
        s = (f"{self.n_kept}/{self.n_records} examples kept (max_length {self.max_length}); "
             f"{self.n_truncated} truncated at a step boundary, {self.n_dropped} dropped "
             f"(first step does not fit); {self.steps_dropped}/{self.steps_total} steps cut; "
             f"{self.labelled_steps} labelled steps; tokens mean {self.len_mean:.1f} max {self.len_max} "
             f"(untruncated max {self.full_len_max})")
        if self.dropped_ids:
            more = "" if len(self.dropped_ids) <= 10 else f" ... (+{len(self.dropped_ids) - 10})"
            s += "; dropped ids: " + ", ".join(self.dropped_ids[:10]) + more
        return s


@dataclass(frozen=True)
class Profile:
    """How a source's question is rendered before its steps.

    With chat (and a tokenizer that has a chat template, and --chat_template on): a system message
    (if not empty) and a user message holding the template; otherwise the template alone and a
    newline. The template holds {question} once; other braces are kept as they are (LaTeX).
    """
    name: str
    chat: bool = True
    system: str = SYSTEM_PROMPT
    template: str = QUESTION

    def render(self, question: str) -> str:
        return self.template.replace(QUESTION, question)


# Built-in profiles; "default" is the rendering dreamprm always used. A "custom" one is built from
# --system_prompt / --prompt_template (train.profiles).
PROFILES = {
    "default": Profile("default"),
    "plain": Profile("plain", chat=False, system="", template=QUESTION),
    "problem_solution": Profile("problem_solution", chat=False, system="", template="Problem: {question}\nSolution:"),
}


def run_profiles(system_prompt: str, prompt_template: str) -> dict[str, Profile]:
    """Every profile a run can use: the built-ins and "custom" (--system_prompt, --prompt_template)."""
    return {**PROFILES, "custom": Profile("custom", chat=True, system=system_prompt, template=prompt_template)}


def profile_problems(p: Profile) -> list[str]:
    return [] if p.template.count(QUESTION) == 1 else [
        f"profile {p.name!r}: template {p.template!r} must contain {QUESTION} exactly once"]


def check_step_tag(tokenizer, tag: str) -> int:
    """Id of the step tag; ModelError (naming tag, tokenizer and an example) unless the tag is exactly
    one token alone and in every probe context."""
    name = f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '') or 'in memory'})"
    fix = (f"let dreamprm add it as a special token (--add_step_tag, the default, grows the embeddings), "
           f"or choose another --step_tag that is one token of {name}")
    ids = tokenizer.encode(tag, add_special_tokens=False)
    tid = tokenizer.convert_tokens_to_ids(tag)
    if len(ids) == 1 and tid != ids[0] and tokenizer.decode(ids) == tag:
        tid = ids[0]  # one token all the same: a byte-level vocabulary spells it otherwise ("\n" is "Ċ")
    if len(ids) != 1 or tid is None or tid != ids[0] or tid == tokenizer.unk_token_id:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise ModelError(f"step tag {tag!r} is not one token of the tokenizer {name}: it encodes to {ids} "
                         f"{pieces} and convert_tokens_to_ids gives {tid!r}; {fix}")
    for probe in _PROBES:
        text = probe.replace("{}", tag)
        enc = tokenizer.encode(text, add_special_tokens=False)
        if enc.count(tid) != text.count(tag):
            raise ModelError(
                f"step tag {tag!r} (id {tid}) merges with neighbouring text in the tokenizer {name}: {text!r} "
                f"encodes to {tokenizer.convert_ids_to_tokens(enc)}, with {enc.count(tid)} tag tokens instead "
                f"of {text.count(tag)}; {fix}")
    return tid


def domain_table(names) -> list[str]:
    """["<none>", *sorted(names)]: index 0 is reserved for records without a domain."""
    return [NO_DOMAIN] + sorted({n for n in names if n is not None} - {NO_DOMAIN})


def _uses_chat(tokenizer, use_chat_template: bool, profile: Profile | None) -> bool:
    return (use_chat_template and (profile is None or profile.chat)
            and bool(getattr(tokenizer, "chat_template", None)))


def prompt_text(question: str, tokenizer, use_chat_template: bool, profile: Profile | None = None) -> str:
    """The text before the first step; profile None = PROFILES["default"]."""
    p = profile or PROFILES["default"]
    if _uses_chat(tokenizer, use_chat_template, p):
        msgs = ([{"role": "system", "content": p.system}] if p.system else []) + [
            {"role": "user", "content": p.render(question)}]
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return p.render(question) + "\n"


def _prompt_ids(questions: list[str], tokenizer, use_chat_template: bool,
                profile: Profile | None = None) -> list[list[int]]:
    chat = _uses_chat(tokenizer, use_chat_template, profile)
    # A rendered template already holds BOS etc., so it is encoded like apply_chat_template
    # does it (no special tokens added); the plain form gets the tokenizer's BOS if it has one.
    texts = [prompt_text(q, tokenizer, chat, profile) for q in questions]
    return tokenizer(texts, add_special_tokens=not chat)["input_ids"]


def _assemble(rec: Record, prompt: list[int], steps: list[list[int]], tag_id: int, max_length: int,
              index: int, domain: int) -> Example | None:
    for k, s in enumerate(steps):
        if tag_id in s:
            raise RuntimeError(f"record {rec.id!r}: steps[{k}] tokenizes to the step tag id {tag_id}; "
                               f"remove the tag text from the step")
    ids, tag_pos, n = list(prompt), [], 0
    for s in steps:
        if len(ids) + len(s) + 1 > max_length:
            break
        ids += s
        tag_pos.append(len(ids))
        ids.append(tag_id)
        n += 1
    if n == 0:
        return None
    labels = [math.nan if y is None else float(y) for y in rec.labels[:n]]
    if (len(tag_pos) != n or len(labels) != n or ids.count(tag_id) != n
            or any(ids[p] != tag_id for p in tag_pos)):
        raise RuntimeError(f"record {rec.id!r}: {n} kept steps but {ids.count(tag_id)} tag tokens in the "
                           f"ids and {len(labels)} labels (does the question contain the step tag?)")
    outcome = math.nan if rec.outcome is None else float(rec.outcome)
    return Example(ids, tag_pos, labels, outcome, index, domain, len(steps), n, rec.id)


def encode_records(records: list[Record], tokenizer, step_tag: str, max_length: int,
                   use_chat_template: bool, domains: list[str] | None = None,
                   profile: Profile | None = None) -> tuple[list[Example], EncodeStats]:
    """Encode a dataset; the stats say what was truncated or dropped (print them).

    Records are validated first (all problems raised at once). domains: the domain names of
    the run (pass the same list for every dataset of a run so the indices agree); profile: how the
    question is rendered (None = PROFILES["default"], with use_chat_template); the table is
    domain_table(domains), "<none>" first. None derives it from these records. Example.index
    is dense over the returned examples, so an instance-weight table has len(examples) rows.
    """
    if max_length < 2:
        raise ValueError(f"max_length {max_length} is too small (need at least 2 tokens)")
    bad = [f"record {r.id!r}: {p}" for r in records for p in record_problems(r, step_tag)]
    if bad:
        raise ValueError(f"{len(bad)} problems in the records:\n  " + "\n  ".join(bad))
    tag_id = check_step_tag(tokenizer, step_tag)
    table = domain_table(r.domain for r in records) if domains is None else domain_table(domains)
    dom_index = {d: i for i, d in enumerate(table)}
    unknown = sorted({r.domain for r in records if r.domain is not None and r.domain not in dom_index})
    if unknown:
        raise ValueError(f"domains {unknown} are not in the domain table {table}; pass domains= the "
                         f"names from every dataset of the run")

    # One tokenizer call for all prompts and one for all steps (fast tokenizers batch in Rust).
    prompts = _prompt_ids([r.question for r in records], tokenizer, use_chat_template, profile) if records else []
    flat = [s for r in records for s in r.steps]
    flat_ids = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    st = EncodeStats(n_records=len(records), domains=table, max_length=max_length)
    examples, lens, at = [], [], 0
    for rec, prompt in zip(records, prompts):
        steps = flat_ids[at:at + len(rec.steps)]
        at += len(rec.steps)
        st.full_len_max = max(st.full_len_max, len(prompt) + sum(len(s) + 1 for s in steps))
        st.steps_total += len(steps)
        ex = _assemble(rec, prompt, steps, tag_id, max_length, len(examples),
                       dom_index[rec.domain] if rec.domain is not None else 0)
        if ex is None:
            st.n_dropped += 1
            st.dropped_ids.append(rec.id)
            st.steps_dropped += len(steps)
            continue
        examples.append(ex)
        lens.append(len(ex.input_ids))
        st.n_truncated += ex.n_kept < ex.n_steps
        st.steps_dropped += ex.n_steps - ex.n_kept
        st.labelled_steps += sum(not math.isnan(y) for y in ex.labels)
    st.n_kept = len(examples)
    if lens:
        st.len_mean, st.len_max = sum(lens) / len(lens), max(lens)
    return examples, st


LENGTH_BUCKETS = (128, 256, 512, 1024, 2048, 4096, 8192)


def length_report(records: list[Record], tokenizer, step_tag: str, use_chat_template: bool,
                  max_length: int | None = None) -> dict:
    """Token lengths of records exactly as training encodes them (encode_records: prompt with or
    without the chat template, one token per step tag), for `dreamprm data check --tokenizer`.

    tokens: mean, percentiles (observed lengths, numpy "higher") and max; buckets: examples per
    length range; with max_length, cut: how many examples that limit keeps whole, truncates at a
    step boundary or drops (not even the first step fits), and the steps it cuts.
    """
    import numpy as np

    examples, _ = encode_records(records, tokenizer, step_tag, 10**9, use_chat_template)
    lengths = np.array([len(e.input_ids) for e in examples])
    out: dict = {"chat_template": bool(use_chat_template and getattr(tokenizer, "chat_template", None))}
    if not len(lengths):
        return out
    pct = {f"p{p}": int(np.percentile(lengths, p, method="higher")) for p in (10, 25, 50, 75, 90, 95, 99)}
    out["tokens"] = {"mean": round(float(lengths.mean()), 1), **pct, "max": int(lengths.max())}
    edges = [0, *LENGTH_BUCKETS]
    out["buckets"] = {f"{lo + 1}-{hi}": int(((lengths > lo) & (lengths <= hi)).sum())
                      for lo, hi in zip(edges, edges[1:])}
    out["buckets"][f">{LENGTH_BUCKETS[-1]}"] = int((lengths > LENGTH_BUCKETS[-1]).sum())
    if max_length is not None:
        _, st = encode_records(records, tokenizer, step_tag, max_length, use_chat_template)
        out["cut"] = {"max_length": max_length, "whole": st.n_kept - st.n_truncated, "truncated": st.n_truncated,
                      "dropped": st.n_dropped, "steps_cut": st.steps_dropped, "steps_total": st.steps_total}
    return out
