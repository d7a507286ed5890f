"""Tiny Qwen2 checkpoints and tokenizer built locally, for tests, demos and CPU smoke runs.

Nothing here downloads: the tokenizer is a byte-level BPE trained on a fixed in-code corpus and the
model is a randomly initialised Qwen2 built from a config.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from dreamprm.checkpoint import AtomicFolder
from dreamprm.config import DEFAULT_STEP_TAG

PAD, IM_START, IM_END, STEP_TAG = "<|endoftext|>", "<|im_start|>", "<|im_end|>", DEFAULT_STEP_TAG
SPECIAL_TOKENS = [PAD, IM_START, IM_END, STEP_TAG]
VOCAB_SIZE = 640
QWEN_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
              r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
TINY_VERSION = 3  # bump when the files written below change, so caches are rebuilt
TINY_MAX_POSITIONS = 1024  # the tiny model's max_position_embeddings (config.py reads it without torch)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CORPUS = [
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Step 1: We have 3 + 4 = 7. Step 2: Then 7 * 2 = 14. The answer is \\boxed{14}.",
    "Let x be the number of apples. Then 2x + 5 = 17, so 2x = 12 and x = 6.",
    "The sum of the angles of a triangle is 180 degrees, so the third angle is 180 - 60 - 70 = 50.",
    "If f(x) = x^2 - 3x + 2, then f(x) = (x - 1)(x - 2) and the roots are 1 and 2.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? 48 / 2 = 24, and 48 + 24 = 72.",
    "The probability of rolling an even number on a fair die is 3 / 6 = 1 / 2.",
    "We compute the derivative: d/dx (x^3) = 3x^2, so the slope at x = 2 is 12.",
    "Since the area of the circle is pi r^2 and r = 5, the area is 25 pi.",
    "theorem add_comm (a b : Nat) : a + b = b + a := by simp [Nat.add_comm]",
    "Therefore the final answer is 42. Let us check: 6 * 7 = 42, which is correct.",
    "The total cost is 12 dollars per hour times 8 hours, which equals 96 dollars.",
    "First, we find the common denominator: 1/3 + 1/4 = 4/12 + 3/12 = 7/12.",
    "Solve for y: 5y - 3 = 2y + 9, so 3y = 12 and y = 4.",
    "The mean of 2, 4, 6, 8 and 10 is (2 + 4 + 6 + 8 + 10) / 5 = 30 / 5 = 6.",
]


def make_tiny_tokenizer():
    """Byte-level BPE tokenizer (Qwen-like special tokens and chat template), deterministic."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Same pipeline as transformers' Qwen2Tokenizer, which AutoTokenizer rebuilds for model_type qwen2
    # (transformers 5): any other pre-tokenizer would change the encoding after a save/load round trip.
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=IM_END, unk_token=None,
        additional_special_tokens=[IM_START, STEP_TAG],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_checkpoint(out_dir, hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128, seed=0,
                         prm=False) -> Path:
    """Write a random Qwen2 checkpoint plus tokenizer to out_dir.

    The default head size (hidden / heads = 32) is one real backbones use: vLLM's CPU attention takes
    32, 64, 80, ... only, and the demo's export must serve there.

    prm=False: a causal-LM checkpoint (Qwen2ForCausalLM). prm=True: the Qwen2ForProcessRewardModel layout
    (keys model.*, score.0.*, score.2.*; architectures ["Qwen2ForProcessRewardModel"]), written directly
    so that loading it does not depend on dreamprm.model's own writer.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Model

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tiny_tokenizer()
    vocab = -(-len(tok) // 64) * 64  # padded like Qwen's vocab, so the model covers every id
    cfg = Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, intermediate_size=intermediate, max_position_embeddings=TINY_MAX_POSITIONS,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    # Weights go through safetensors, not save_pretrained: transformers 5 writes no weights from a rank
    # other than 0 once a process group exists, and every rank of a first run builds this folder.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not prm:
            lm = Qwen2ForCausalLM(cfg)
            sd = {k: v.contiguous() for k, v in lm.state_dict().items() if k != "lm_head.weight"}  # tied
            cfg.architectures = ["Qwen2ForCausalLM"]
        else:
            base = Qwen2Model(cfg)
            score = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                        torch.nn.Linear(hidden, 2))
            sd = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
            sd.update({f"score.{k}": v.contiguous() for k, v in score.state_dict().items()})
            cfg.architectures = ["Qwen2ForProcessRewardModel"]
            cfg.num_labels = 2
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return out


TINY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_tiny_dir(**params) -> Path:
    """Cached tiny checkpoint ($DREAMPRM_CACHE or ~/.cache/dreamprm), built once and atomically.

    params are passed to make_tiny_checkpoint and, with the library versions, name the cache folder, so a
    changed recipe never reuses a stale build. Concurrent builders (e.g. several ranks) race safely: each
    writes a temporary folder and the first rename wins (AtomicFolder.publish).
    """
    import transformers

    root = Path(os.environ.get("DREAMPRM_CACHE") or Path.home() / ".cache" / "dreamprm")
    key = json.dumps({"v": TINY_VERSION, "transformers": transformers.__version__, **params}, sort_keys=True)
    name = f"tiny-qwen2-{'prm-' if params.get('prm') else ''}{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    final = root / name
    if _whole(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    folder = AtomicFolder(final, tmp=Path(tempfile.mkdtemp(prefix=".tmp-tiny-", dir=root)))  # unique per builder
    try:
        tmp = folder.begin()
        make_tiny_checkpoint(tmp, **params)
        if not _whole(tmp):  # never publish a partial folder: every later run would take it for the model
            raise RuntimeError(f"building the tiny model in {tmp} left out "
                               f"{', '.join(f for f in TINY_FILES if not (tmp / f).is_file())}")
        folder.publish()
    except OSError:
        if not _whole(final):  # a real failure, not a lost race
            if final.exists():
                raise RuntimeError(f"{final} is an incomplete tiny-model folder (it lacks "
                                   f"{', '.join(f for f in TINY_FILES if not (final / f).is_file())}); "
                                   f"delete it and run again") from None
            raise
    finally:
        folder.abort()
    return final


def _whole(folder: Path) -> bool:
    return all((folder / f).is_file() for f in TINY_FILES)
