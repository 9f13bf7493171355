"""Tokenizers round-trip text; an HF tokenizer.json is built inside the test (no download)."""

from __future__ import annotations

import pytest

from flexmore.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["hello world", "", "Ünïcödé ✓ — 漢字 🙂", "def f(x):\n    return x + 1\n", "a" * 1000]


@pytest.mark.parametrize("text", TEXTS)
def test_byte_round_trip(text):
    tok = load_tokenizer("byte")
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_specials_are_outside_the_byte_range_and_dropped_on_decode():
    tok = ByteTokenizer()
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258} and tok.vocab_size == 259
    assert tok.decode([104, 105, tok.eos_id]) == "hi"


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 20 + ["the quick brown fox jumps over the lazy dog"] * 50, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.mark.parametrize("text", TEXTS + ["the lazy fox"])
def test_hf_tokenizer_round_trip(hf_tokenizer_file, text):
    tok = load_tokenizer(str(hf_tokenizer_file))
    assert isinstance(tok, HFTokenizer)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eos_id == 0 and tok.vocab_size <= 400


def test_hf_tokenizer_compresses_and_is_named_by_content(hf_tokenizer_file):
    tok = load_tokenizer(str(hf_tokenizer_file.parent))  # a folder holding tokenizer.json works too
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")
    assert tok.name.startswith("hf-") and tok.name == HFTokenizer(hf_tokenizer_file).name


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))


def test_prep_takes_the_end_of_document_token_of_a_tokenizer_without_a_usual_one(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from flexmore.cli.prep import main
    from flexmore.data.shards import read_index

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|doc|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("hello world")
    args = [str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tokenizer.json"), "--out"]
    assert main(args + [str(tmp_path / "bad")]) == 2
    assert "flexmore-prep --eos-token TOKEN" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(args + [str(tmp_path / "ok"), "--eos-token", "<|doc|>"]) == 0
    assert read_index(tmp_path / "ok")["eos_id"] == tok.token_to_id("<|doc|>")
    with pytest.raises(ValueError, match="eos_token='</s>': the byte tokenizer's end of document is fixed"):
        load_tokenizer("byte", eos_token="</s>")
