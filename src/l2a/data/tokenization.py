"""Tokenizers: a byte-level tokenizer for tiny models and a loader for everything else.

The byte tokenizer is an ordinary `tokenizers` BPE model with the 256 byte symbols as its vocabulary and
no merges, so every UTF-8 byte is exactly one token (id = byte value) and any text round-trips. It is
saved as a plain ``tokenizer.json``: ``AutoTokenizer.from_pretrained`` reloads it with no custom code.
"""

from __future__ import annotations

from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

BYTE_PAD, BYTE_BOS, BYTE_EOS = "<pad>", "<bos>", "<eos>"
"""Special tokens of the byte tokenizer; their ids are 256, 257, 258 (after the byte ids 0..255)."""


@cache
def _byte_symbols() -> tuple[str, ...]:
    """The printable stand-in character of each byte used by the ByteLevel pre-tokenizer/decoder (GPT-2's
    table: printable Latin-1 bytes map to themselves, the others to code points from 256 on)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = {}
    extra = 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return tuple(symbols[byte] for byte in range(256))


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens (id = byte value), ``<pad>`` 256, ``<bos>`` 257, ``<eos>`` 258.

    ``decode(encode(s)) == s`` for every string, including text that spells a special token (``"<eos>"``
    in the text is five byte tokens, never the eos id). Nothing is added by ``add_special_tokens``.
    """
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # use_regex=False: no word splitting, each byte stays its own token and the mapping is lossless.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BYTE_PAD, BYTE_BOS, BYTE_EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=BYTE_PAD,
        bos_token=BYTE_BOS,
        eos_token=BYTE_EOS,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
        model_max_length=2**40,
    )


def load_tokenizer(path_or_name: str) -> PreTrainedTokenizerBase:
    """``"byte"`` → `byte_tokenizer()`; anything else → ``AutoTokenizer.from_pretrained(path_or_name)``."""
    if path_or_name == "byte":
        return byte_tokenizer()
    return AutoTokenizer.from_pretrained(path_or_name)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens and without the over-length warning."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def encode_with_offsets(
    tokenizer: PreTrainedTokenizerBase, text: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of ``text`` (no special tokens) and each token's [start, end) character span in ``text``.

    Needs a fast (Rust ``tokenizers``-backed) tokenizer, which every HF model of interest has.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            "a fast (tokenizers-backed) tokenizer is needed for character offsets, "
            f"got {type(tokenizer).__name__}"
        )
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return out["input_ids"], [tuple(span) for span in out["offset_mapping"]]


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids the tokenizer puts in front of a text by itself (e.g. ``[bos]`` for Llama, ``[]`` for Qwen)."""
    plain = encode(tokenizer, "a")
    full = tokenizer("a", add_special_tokens=True, verbose=False)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return list(full[:start])
    return []
