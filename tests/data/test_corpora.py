import json
from itertools import islice

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from l2a.data import DocumentStream, iter_documents, stdlib_corpus, stdlib_corpus_dir


@pytest.fixture
def corpus_dir(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.py").write_text("beta = 1\n")
    (tmp_path / "sub" / "c.md").write_text("# gamma")
    (tmp_path / "sub" / "skip.bin").write_text("not text")
    (tmp_path / "sub" / "empty.txt").write_text("  \n")
    (tmp_path / "__pycache__" / "d.py").write_text("cached")
    return tmp_path


def test_directory_recursive_sorted(corpus_dir):
    assert list(iter_documents(corpus_dir)) == ["alpha", "beta = 1\n", "# gamma"]
    assert list(iter_documents(corpus_dir, extensions=(".md",))) == ["# gamma"]


def test_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(5)) + "\n\n")
    assert list(iter_documents(path, text_field="body")) == [f"doc {i}" for i in range(5)]
    with pytest.raises(KeyError, match="text"):
        list(iter_documents(path))


def test_parquet_and_lists(tmp_path, corpus_dir):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(600)]}), path, row_group_size=100)
    rows = list(iter_documents(path))
    assert rows == [f"row {i}" for i in range(600)]
    both = list(iter_documents([path, corpus_dir / "a.txt"]))
    assert both == rows + ["alpha"]


def test_shuffle_is_a_deterministic_permutation(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"doc {i}"}) for i in range(50)))
    plain = list(iter_documents(path))
    first = list(iter_documents(path, shuffle_seed=1, shuffle_buffer=8))
    assert sorted(first) == sorted(plain) and first != plain
    assert first == list(iter_documents(path, shuffle_seed=1, shuffle_buffer=8))
    assert first != list(iter_documents(path, shuffle_seed=2, shuffle_buffer=8))


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list(iter_documents(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="nope"):
        DocumentStream(tmp_path / "nope")


def test_stdlib_corpus():
    root = stdlib_corpus_dir()
    assert (root / "os.py").exists()
    docs = list(islice(stdlib_corpus(), 20))
    assert len(docs) == 20 and all(isinstance(d, str) and d.strip() for d in docs)
    assert docs == list(islice(iter_documents("stdlib"), 20))


def test_stdlib_skips_tests_and_site_packages():
    import l2a.data.corpora as corpora

    files = corpora._files("stdlib", (".py",))
    parts = {part for path in files for part in path.relative_to(stdlib_corpus_dir()).parts[:-1]}
    assert not parts & {"site-packages", "test", "tests", "__pycache__"}
    assert any(path.name == "os.py" for path in files)


def test_document_stream_restarts(corpus_dir):
    stream = DocumentStream(corpus_dir)
    assert list(stream) == list(stream) == ["alpha", "beta = 1\n", "# gamma"]
