"""Data for l2a: tokenizers, streamed local corpora, document packing, task mixing and long-context tasks.

Tasks and their scoring live in `l2a.data.tasks`.
"""

from l2a.data.corpora import DocumentStream, iter_documents, stdlib_corpus, stdlib_corpus_dir
from l2a.data.mixing import MixedDataset, TaskSampler
from l2a.data.packing import IGNORE_INDEX, PackedDataset, build_sequence, collate_packed, pack_documents
from l2a.data.tokenization import byte_tokenizer, load_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "DocumentStream",
    "MixedDataset",
    "PackedDataset",
    "TaskSampler",
    "build_sequence",
    "byte_tokenizer",
    "collate_packed",
    "iter_documents",
    "load_tokenizer",
    "pack_documents",
    "stdlib_corpus",
    "stdlib_corpus_dir",
]
