import pytest
from transformers import AutoTokenizer

from l2a.data import byte_tokenizer, load_tokenizer
from l2a.data.tokenization import encode, special_prefix

TEXTS = {
    "ascii": "def f(x):\n    return x + 1\n",
    "unicode": "héllo wörld — 日本語 😀\t\r\n",
    "special-lookalike": "a<eos>b<pad><bos>",
    "empty": "",
    "whitespace": "   \n\n  ",
}


@pytest.mark.parametrize("text", TEXTS.values(), ids=TEXTS.keys())
def test_byte_tokenizer_round_trip(byte_tok, text):
    ids = encode(byte_tok, text)
    assert ids == list(text.encode("utf-8"))
    assert byte_tok.decode(ids) == text


def test_byte_tokenizer_specials():
    tok = byte_tokenizer()
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (256, 257, 258)
    assert len(tok) == 259
    assert tok("abc")["input_ids"] == [97, 98, 99]  # add_special_tokens adds nothing
    assert special_prefix(tok) == []
    assert tok.decode([104, 105, 258], skip_special_tokens=True) == "hi"


def test_byte_tokenizer_save_reload(tmp_path, byte_tok):
    byte_tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    for reloaded in (AutoTokenizer.from_pretrained(tmp_path), load_tokenizer(str(tmp_path))):
        for text in TEXTS.values():
            assert encode(reloaded, text) == encode(byte_tok, text)
            assert reloaded.decode(encode(reloaded, text)) == text
        assert reloaded.eos_token_id == 258 and reloaded.pad_token_id == 256


def test_load_tokenizer_byte():
    assert load_tokenizer("byte").eos_token_id == 258
