"""Tokenizers for the data tests: the byte tokenizer and a small BPE trained on stdlib text (< 1 s)."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from l2a.data import byte_tokenizer, iter_documents


@pytest.fixture(scope="session")
def byte_tok():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def bpe_tok():
    """A GPT-2-style byte-level BPE (vocab 2000) trained on ~300 KB of the standard library."""
    documents, size = [], 0
    for document in iter_documents("stdlib"):
        documents.append(document)
        size += len(document)
        if size > 300_000:
            break
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(documents, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.fixture(params=["byte", "bpe"])
def tokenizer(request, byte_tok, bpe_tok):
    return byte_tok if request.param == "byte" else bpe_tok
