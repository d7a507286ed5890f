"""Score solutions with a trained PRM, and evaluate one on step labels during training.

    from dreamprm.scoring import load_scorer
    scorer = load_scorer("runs/prm")                       # run dir: its latest complete checkpoint
    scorer = load_scorer("runs/prm/checkpoints/step_00000500")   # one checkpoint
    scorer = load_scorer("exported/prm")                   # `dreamprm export` folder (merged or adapter)
    scorer.score(question, steps)                          # [P(step 1 correct), ...]
    scorer.score_solution(question, steps, "min")          # one of metrics.AGGREGATIONS
    scorer.score_records(records, batch_size=8)            # {record id: [p1, ...]}; Records or dicts

Text is tokenized exactly as in training (data.tokenize.encode_records, with the step tag and
chat-template setting the model was trained with), and nothing is truncated: a solution that
does not fit in max_length tokens is an error naming it. A checkpoint is rebuilt from the
config saved in it (build_prm in fp32) and its consolidated fp32 state dict
(engine.consolidated_state_dict, any ZeRO stage); a LoRA checkpoint holds only the trained
weights and is rebuilt on its base folder, checked against the fingerprint it records.

"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from pathlib import Path

import torch

from dreamprm import checkpoint as ckpt_io
from dreamprm.checkpoint import MANIFEST, SHARED_STATE
from dreamprm import metrics as M
from dreamprm.config import CHECKPOINTS_DIR, DEFAULT_STEP_TAG, ModelConfig
from dreamprm.data.loader import collate
from dreamprm.data.record import Record, record_from_json, record_problems
from dreamprm.data.tokenize import Profile, encode_records
from dreamprm.errors import CheckpointError, ModelError, ScoringError
from dreamprm.model import HEAD_FILE, base_fingerprint, base_mismatch, build_prm, load_prm, step_probs
from dreamprm.preflight import model_length_limit

EXPORT_INFO = "dreamprm.json"  # written by `dreamprm export` next to the weights


# ---------------------------------------------------------------- scoring


class Scorer:
    """A PRM in eval mode with the tokenization it was trained with."""

    def __init__(self, prm, tokenizer, step_tag: str, chat_template: bool = True, max_length: int | None = None,
                 device=None, source: str = "", profile: Profile | None = None):
        self.prm = prm.eval()
        self.tokenizer = tokenizer
        self.step_tag = step_tag
        self.chat_template = chat_template
        self.profile = profile  # how questions are rendered (None: PROFILES["default"])
        base = getattr(prm.model, "config", None)
        # the one length rule (preflight.effective_max_length): min(asked for, the model's limit)
        self.model_limit = model_length_limit(base.to_dict()) if base is not None else None
        self.max_length = min(x for x in (max_length, self.model_limit, 10**9) if x)
        self.source = source
        if device is not None and not _is_quantized(prm):  # 4-bit weights cannot be moved with .to
            self.prm.to(device)
        self.device = next(self.prm.parameters()).device
        # Right padding under a causal mask: pad ids never reach a real position, any id will do.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def score(self, question: str, steps: list[str]) -> list[float]:
        """P(step correct) for every step of one solution."""
        return self.score_batch([(question, steps)])[0]

    def score_solution(self, question: str, steps: list[str], how: str = "mean_logodds") -> float:
        """One solution score: the step scores aggregated by `how` (metrics.AGGREGATIONS)."""
        return M.aggregate(self.score(question, steps), how)

    def score_batch(self, items: list[tuple[str, list[str]]], batch_size: int = 8) -> list[list[float]]:
        """Step scores for (question, steps) pairs, in order."""
        records = [Record(id=f"#{i}", question=q, steps=list(s), labels=[None] * len(s))
                   for i, (q, s) in enumerate(items)]
        out = self.score_records(records, batch_size)
        return [out[r.id] for r in records]

    def score_records(self, records: list, batch_size: int = 8) -> dict[str, list[float]]:
        """{record id: step scores} (the interface `dreamprm evaluate --model` uses).

        records: dreamprm Records, or plain dicts with "id", "question" and "steps" (the
        internal JSONL form; labels are not needed to score)."""
        if batch_size < 1:
            raise ScoringError(f"batch_size must be >= 1, got {batch_size}")
        records = [_as_record(r, i) for i, r in enumerate(records)]
        ids = [r.id for r in records]
        if len(set(ids)) != len(ids):
            dup = sorted({i for i in ids if ids.count(i) > 1})
            raise ScoringError(f"record ids must be unique to key the scores; repeated: {dup[:5]}")
        try:
            examples, st = encode_records(records, self.tokenizer, self.step_tag, self.max_length,
                                          self.chat_template, profile=self.profile)
        except ValueError as e:
            raise ScoringError(str(e)) from e
        if st.n_dropped or st.n_truncated:
            too_long = [f"{ex.id!r} ({ex.n_kept} of {ex.n_steps} steps fit)" for ex in examples
                        if ex.n_kept < ex.n_steps]
            too_long = [repr(i) + " (not even its first step fits)" for i in st.dropped_ids] + too_long
            raise ScoringError(
                f"{len(too_long)} solution(s) do not fit in max_length {self.max_length} tokens (the longest is "
                f"{st.full_len_max}; the model takes {self.model_limit}); scores of a cut solution would be "
                "missing steps. Not scored: "
                + ", ".join(too_long[:10]) + (f" and {len(too_long) - 10} more" if len(too_long) > 10 else "")
                + ". Leave them out or cut them (Scorer.fit_to_length; `dreamprm evaluate --too-long cut` or "
                f"`skip`), or pass a larger max length up to the model's limit ({self.model_limit}): `dreamprm "
                "evaluate --max-length N`, load_scorer(..., max_length=N)")
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))  # less padding
        out = {}
        with torch.no_grad():
            for at in range(0, len(order), batch_size):
                chunk = [examples[i] for i in order[at:at + batch_size]]
                probs = step_probs(self._forward(collate(chunk, self.pad_id))).cpu()
                for ex, p in zip(chunk, probs):
                    out[ex.id] = p[:ex.n_kept].tolist()
        return {i: out[i] for i in ids}

    def fit_to_length(self, records: list, how: str) -> tuple[list[Record], dict[str, tuple[int, int]], list[str]]:
        """(records that fit, {id: (steps kept, steps) of those cut}, ids skipped) at max_length.

        how = "cut": a solution too long is cut at the last step boundary that fits (as in
        training; its later steps get no score) and one whose first step does not fit is
        skipped; how = "skip": every solution too long is skipped."""
        if how not in ("cut", "skip"):
            raise ScoringError(f"how must be 'cut' or 'skip', got {how!r}")
        records = [_as_record(r, i) for i, r in enumerate(records)]
        try:
            examples, st = encode_records(records, self.tokenizer, self.step_tag, self.max_length,
                                          self.chat_template, profile=self.profile)
        except ValueError as e:
            raise ScoringError(str(e)) from e
        kept = {ex.id: ex.n_kept for ex in examples}
        cut = {r.id: (kept[r.id], len(r.steps)) for r in records if r.id in kept and kept[r.id] < len(r.steps)}
        skipped = [r.id for r in records if r.id not in kept or (how == "skip" and r.id in cut)]
        out = []
        for r in records:
            if r.id in skipped:
                continue
            if r.id in cut:
                k = kept[r.id]
                meta = dict(r.meta)
                if isinstance(meta.get("first_error"), int) and meta["first_error"] >= k:
                    meta["first_error"] = -1  # the error lies in the part cut off
                r = dataclasses.replace(r, steps=r.steps[:k], labels=r.labels[:k], meta=meta)
            out.append(r)
        return out, ({} if how == "skip" else cut), skipped

    def _forward(self, batch: dict) -> torch.Tensor:
        return self.prm(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                        batch["tag_pos"].to(self.device))


def _as_record(r, i: int) -> Record:
    if isinstance(r, Record):
        return r
    if not isinstance(r, dict):
        raise ScoringError(f"records[{i}]: expected a dreamprm Record or a dict with id, question and steps, "
                           f"got {type(r).__name__}")
    try:
        rec = record_from_json(r)
    except KeyError as e:
        raise ScoringError(f"records[{i}]: missing {e.args[0]} (a dict needs id, question and steps)") from None
    except ValueError as e:
        raise ScoringError(f"records[{i}]: {e}") from None
    bad = [p for p in record_problems(rec, "") if not p.startswith("labels")]
    if bad:
        raise ScoringError(f"records[{i}] (id {rec.id!r}): " + "; ".join(bad))
    return dataclasses.replace(rec, labels=[None] * len(rec.steps))


def _is_quantized(prm) -> bool:
    return any(type(p).__name__ == "Params4bit" for p in prm.parameters())


# ---------------------------------------------------------------- loading


def load_scorer(path, *, checkpoint: str | None = None, step_tag: str | None = None, precision: str = "fp32",
                device=None, max_length: int | None = None, chat_template: bool | None = None,
                profile: str | None = None) -> Scorer:
    """A Scorer from a run directory, a checkpoint folder (step_N) or an exported model folder.

    checkpoint: a checkpoint of the run directory (step_N, or N) instead of its latest.
    step_tag: only for a model folder that does not record its tag (e.g. the released Qwen2.5-Math-PRM:
      '<extra_0>'); a tag that differs from the recorded one is an error.
    device: default cuda when available, else cpu. max_length: longest solution in tokens (default the
    one the model was trained with, as its checkpoint or export records it; never more than the model's
    max_position_embeddings). chat_template: override the recorded setting (default: as trained, True for
    folders that do not record it). profile: which of the prompt profiles the run recorded renders
    the questions (default: the run's --profile); folders that record none render as PROFILES["default"].
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    p = Path(path).expanduser()
    kind = path_kind(p)
    if kind == "model":
        if checkpoint is not None:
            raise ScoringError(f"{p} is an exported model folder; checkpoint= is for run directories")
        prm, tok, tag, info = load_exported(p, precision, step_tag)
        chat, trained = info.get("chat_template", True), info.get("max_length")
        prof = pick_profile(info.get("profiles"), info.get("profile"), profile, p)
    else:
        ckpt = resolve_checkpoint(p, checkpoint)
        prm, tok, cfg = load_checkpoint_prm(ckpt, precision)
        tag, chat = cfg["model"]["step_tag"], cfg["model"]["chat_template"]
        trained = cfg["data"]["max_length"]
        recorded = torch.load(ckpt / SHARED_STATE, weights_only=True, map_location="cpu").get("profiles")
        prof = pick_profile(recorded, cfg.get("data", {}).get("profile"), profile, ckpt)
        if step_tag is not None and step_tag != tag:
            raise ScoringError(f"{ckpt} was trained with step tag {tag!r}, not {step_tag!r}")
        p = ckpt
    return Scorer(prm, tok, tag, chat if chat_template is None else chat_template, max_length or trained, device,
                  str(p), prof)


def pick_profile(recorded: dict | None, default: str | None, wanted: str | None, where) -> Profile | None:
    """The Profile a run recorded under `wanted` (or its default); None for runs that record none."""
    if not recorded:
        if wanted not in (None, "default"):
            raise ScoringError(f"{where} records no prompt profiles (trained before profiles existed, or not by "
                               f"dreamprm); it renders as the default profile, not {wanted!r}")
        return None
    name = wanted or default or "default"
    if name not in recorded:
        raise ScoringError(f"{where} records the prompt profiles {sorted(recorded)}, not {name!r}")
    return Profile(**recorded[name])


def path_kind(p: Path) -> str:
    """'run', 'checkpoint' or 'model' (an exported / Hugging Face folder); ScoringError otherwise."""
    if not p.exists():
        raise ScoringError(f"{p} does not exist")
    if not p.is_dir():
        raise ScoringError(f"{p} is a file; pass a run directory, a checkpoint folder (run/checkpoints/step_N) "
                           "or an exported model folder")
    if (p / CHECKPOINTS_DIR).is_dir() or (p / "config.yaml").is_file() or (p / "status.json").is_file():
        return "run"
    if ((p / MANIFEST).is_file() or (p / SHARED_STATE).is_file()
            or ckpt_io.step_of(p.name.removesuffix(".tmp")) is not None):  # step_N, or step_N.tmp (a partial save)
        return "checkpoint"
    if (p / "config.json").is_file() or (p / "adapter_config.json").is_file():
        return "model"
    raise ScoringError(f"{p} is not a run directory (no checkpoints/ or config.yaml), a checkpoint folder (no "
                       f"{MANIFEST}) or a model folder (no config.json or adapter_config.json)")


def resolve_checkpoint(p: Path, checkpoint: str | None = None) -> Path:
    """The complete checkpoint to load: the run's latest (or the named one), or p itself.

    Refuses runs without a complete checkpoint and partial or damaged checkpoints, saying what is missing.
    """
    if path_kind(p) == "checkpoint":
        if checkpoint is not None:
            raise ScoringError(f"{p} is a checkpoint folder already; checkpoint= is for run directories")
        ckpt = p
    else:
        root = p / CHECKPOINTS_DIR
        found = sorted(root.glob("step_*")) if root.is_dir() else []
        listing = ", ".join(f.name + ("" if (f / MANIFEST).is_file() else " (partial: no MANIFEST.json)")
                            for f in found) or "none"
        if checkpoint is not None:
            name = checkpoint.strip()
            n = int(name) if re.fullmatch(r"\d+", name) else ckpt_io.step_of(name)  # 500 or step_500
            if n is not None:
                name = ckpt_io.tag(n)
            ckpt = root / name
            if not ckpt.is_dir():
                raise ScoringError(f"{p}: no checkpoint {checkpoint!r} ({ckpt} does not exist); checkpoints "
                                   f"there: {listing}")
        else:
            cands, notes = ckpt_io.resume_candidates(root)  # `latest` is a hint, as for resuming
            ckpt = cands[0] if cands else None
            for n in notes if ckpt is not None else ():
                print(f"dreamprm: {n.replace('resuming from', 'using')}", file=sys.stderr)
            if ckpt is None:
                raise ScoringError(
                    f"{p} has no complete checkpoint: {root / 'latest'} is missing (checkpoint folders: "
                    f"{listing}). A run writes one every --save_every updates, at the end, and on SIGTERM; "
                    "wait for one, or stop the run with SIGTERM")
    try:
        ckpt_io.verify(ckpt)
    except CheckpointError as e:
        raise ScoringError(str(e)) from e
    if not (ckpt / SHARED_STATE).is_file():  # a manifest written by something else
        raise ScoringError(f"checkpoint {ckpt} has no {SHARED_STATE} (the run config); not a dreamprm checkpoint")
    return ckpt


def _model_config(cfg: dict):
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in cfg["model"].items() if k in known})


def load_checkpoint_prm(ckpt: Path, precision: str = "fp32"):
    """(prm in eval mode, tokenizer, run config dict) from a complete checkpoint.

    The PRM is rebuilt from the checkpoint's config (peft module names included) and gets its
    consolidated state dict: the whole model for a full fine-tune (and for checkpoints written before
    LoRA ones left the base out), only the trained weights (LoRA, head) for a LoRA checkpoint, whose frozen
    base is read from the folder the run trained on after its files are checked against the fingerprint
    the checkpoint records. QLoRA: the 4-bit base is rebuilt by quantizing the base folder again in the
    training precision (deterministic, as in training) and only the trained weights are loaded.
    """
    from dreamprm import engine  # deepspeed: only when a checkpoint is loaded

    state = torch.load(ckpt / SHARED_STATE, weights_only=True, map_location="cpu")
    cfg, base = state["config"], state.get("base")
    mcfg = _model_config(cfg)
    mcfg.gradient_checkpointing = False  # no backward here
    qlora = mcfg.mode == "qlora"
    if base is not None:  # the folder as the run resolved it, whatever the current directory is now
        if not Path(base["path"]).is_dir():
            raise ScoringError(f"checkpoint {ckpt} holds only the trained weights (LoRA adapters, head) and is "
                               f"rebuilt on the base model folder it was trained on, {base['path']}, which does "
                               "not exist any more; put that folder back (a copy with the same files is fine)")
        msg = base_mismatch(base, base_fingerprint(Path(base["path"])), f"cannot load {ckpt}")
        if msg:
            raise ScoringError(msg)
        mcfg.name_or_path = base["path"]
    with torch.random.fork_rng(devices=[]):  # build_prm draws the fresh head from the global RNG
        prm, tok = build_prm(mcfg, cfg["train"]["precision"] if qlora else precision)
    with contextlib.redirect_stdout(sys.stderr):  # zero_to_fp32 prints its progress
        sd = engine.consolidated_state_dict(ckpt)
    if qlora or base is not None:
        want = {n for n, q in prm.named_parameters() if q.requires_grad}
        missing = sorted(want - set(sd))
        if missing:
            raise ScoringError(f"checkpoint {ckpt} lacks trained weights {missing[:5]}")
        prm.load_state_dict({k: sd[k] for k in want}, strict=False)
    else:
        res = prm.load_state_dict(sd, strict=False)
        if res.missing_keys or res.unexpected_keys:
            raise ScoringError(f"checkpoint {ckpt} does not match the model its config builds: missing "
                               f"{res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]}")
    return prm.eval(), tok, cfg


def recorded_step_tag(p: Path) -> str | None:
    """The step tag an exported folder records (config.json or the adapter's head file), None if none."""
    if (p / "adapter_config.json").is_file():
        if not (p / HEAD_FILE).is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(p / HEAD_FILE), "pt") as sf:
            return (sf.metadata() or {}).get("step_tag")
    try:
        return json.loads((p / "config.json").read_text()).get("dreamprm_step_tag")
    except (OSError, json.JSONDecodeError) as e:
        raise ScoringError(f"{p}/config.json cannot be read: {e}") from e


def load_exported(p: Path, precision: str = "fp32", step_tag: str | None = None):
    """(prm, tokenizer, step tag, export info) from a folder written by save_prm / save_adapter."""
    recorded = recorded_step_tag(p)
    if recorded is None and step_tag is None:
        where = (f"{HEAD_FILE} metadata" if (p / "adapter_config.json").is_file()
                 else "config.json ('dreamprm_step_tag')")
        raise ScoringError(
            f"{p} does not record its step tag ({where}), so the positions to score are unknown. Pass it "
            f"(load_scorer(path, step_tag=...); Qwen2.5-Math-PRM uses {DEFAULT_STEP_TAG!r}), or add "
            f"\"dreamprm_step_tag\": \"<tag>\" to its config.json; `dreamprm export` records it")
    if recorded is not None and step_tag is not None and step_tag != recorded:
        raise ScoringError(f"{p} records step tag {recorded!r}, not {step_tag!r}")
    info = json.loads((p / EXPORT_INFO).read_text()) if (p / EXPORT_INFO).is_file() else {}
    try:
        prm, tok, _ = load_prm(p, precision)
    except (OSError, ValueError, ModelError) as e:
        raise ScoringError(f"cannot load the PRM in {p}: {e}") from e
    return prm, tok, recorded or step_tag, info
