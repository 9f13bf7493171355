"""Shards, prep, the resumable loader and the embedded corpus."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from flexmore.data import SequenceLoader, TokenStream, eval_batches, prepare, read_index, write_documents
from flexmore.data.domains import DOMAINS, facts, math
from flexmore.data.domains import code as code_domain
from flexmore.data.embedded import embedded_path
from flexmore.data.tokenizer import ByteTokenizer


def make_inputs(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("first document, plain text")
    with open(tmp_path / "in" / "b.jsonl", "w") as f:
        for i in range(5):
            f.write(json.dumps({"body": f"json doc {i}", "id": i}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": [f"parquet row {i}" for i in range(4)]}), tmp_path / "in" / "c.parquet")
    return tmp_path / "in"


def test_prep_reads_txt_jsonl_parquet_and_is_deterministic(tmp_path):
    src = make_inputs(tmp_path)
    tok = ByteTokenizer()
    (tmp_path / "in" / "a.txt").write_text("first document, plain text")
    with pytest.raises(KeyError, match="no field 'text'"):
        prepare([src], tmp_path / "bad", tok)
    assert not (tmp_path / "bad").exists()  # nothing half-written
    a = prepare([src], tmp_path / "out_a", tok, field="body", shard_tokens=64)
    b = prepare([src], tmp_path / "out_b", tok, field="body", shard_tokens=64)
    ix = read_index(a)
    assert ix["num_documents"] == 1 + 5 + 4 and ix["dtype"] == "uint16" and len(ix["shards"]) > 1
    for sh in ix["shards"]:
        assert (a / sh["file"]).read_bytes() == (b / sh["file"]).read_bytes()
    stream = TokenStream([a])
    text = tok.decode(stream.read(0, stream.num_tokens))  # EOS ids are dropped on decode
    assert text.startswith("first document, plain text") and "json doc 4" in text and text.endswith("parquet row 3")
    assert int((stream.read(0, stream.num_tokens) == tok.eos_id).sum()) == 10


def test_prep_reads_hugging_face_datasets_folders_and_arrow_files(tmp_path, capsys):
    """save_to_disk folders (a Dataset; a DatasetDict's train split) and their .arrow files give the same documents
    as the same texts in a JSONL file."""
    datasets = pytest.importorskip("datasets")
    from flexmore.cli.prep import main

    train = [f"train doc {i}" for i in range(6)] + [""]  # an empty text is skipped, as in every other format
    ds = datasets.Dataset.from_dict({"body": train, "n": list(range(7))})
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_dict({"body": ["val doc"]})}).save_to_disk(
        str(tmp_path / "dd"))
    with open(tmp_path / "same.jsonl", "w") as f:
        for t in train:
            f.write(json.dumps({"body": t}) + "\n")
    tok = ByteTokenizer()
    want = TokenStream([prepare([tmp_path / "same.jsonl"], tmp_path / "want", tok, field="body")])
    arrow = sorted((tmp_path / "ds").glob("*.arrow"))
    for name, src in (("ds", tmp_path / "ds"), ("dd", tmp_path / "dd"), ("arrow", arrow[0])):
        got = TokenStream([prepare([src], tmp_path / f"out-{name}", tok, field="body")])
        assert got.read(0, got.num_tokens).tolist() == want.read(0, want.num_tokens).tolist(), name
    assert main([str(tmp_path / "ds"), "--out", str(tmp_path / "bad")]) == 2  # no 'text' column: named
    assert "has no column 'text' (columns: ['body', 'n']); set --field" in capsys.readouterr().err
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "noval"))
    with pytest.raises(ValueError, match=r"without a 'train' split \(splits: \['validation'\]\)"):
        prepare([tmp_path / "noval"], tmp_path / "bad2", tok, field="body")
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists()


def test_uint32_for_large_vocabularies(tmp_path):
    out = write_documents(tmp_path / "big", [[70_000, 1, 2]], vocab_size=100_352, eos_id=0, tokenizer="x")
    assert read_index(out)["dtype"] == "uint32"
    assert TokenStream([out]).read(0, 4).tolist() == [70_000, 1, 2, 0]


def test_token_ids_outside_vocab_are_rejected_at_prep(tmp_path):
    with pytest.raises(ValueError, match="token id 300 is outside the vocabulary"):
        write_documents(tmp_path / "x", [[1, 300]], vocab_size=259, eos_id=257, tokenizer="byte")


@pytest.mark.parametrize("setup, match", [
    (lambda p: None, "does not exist"),
    (lambda p: p.mkdir(), "has no index.json"),
])
def test_missing_data_paths_are_clear_errors(tmp_path, setup, match):
    setup(tmp_path / "d")
    with pytest.raises(FileNotFoundError, match=match):
        TokenStream([tmp_path / "d"])


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="input is empty"):
        prepare([tmp_path / "e.txt"], tmp_path / "out", ByteTokenizer())
    assert not (tmp_path / "out").exists()


def numbered_stream(tmp_path, n=1000):
    """Tokens 0..n-1 in documents of 7, so every window's content says where it came from."""
    ids = np.arange(n) % 250
    docs = [ids[i : i + 6].tolist() for i in range(0, n, 7)]
    return TokenStream([write_documents(tmp_path / "num", docs, vocab_size=259, eos_id=257, tokenizer="byte",
                                        shard_tokens=97)])


def test_reads_cross_shard_boundaries(tmp_path):
    s = numbered_stream(tmp_path)
    flat = np.concatenate([np.asarray(a) for a in s.arrays])
    assert np.array_equal(s.read(90, 20), flat[90:110])


def test_loader_is_deterministic_resumable_and_rank_disjoint(tmp_path):
    s = numbered_stream(tmp_path)
    mk = lambda r, w=2, seed=5: SequenceLoader(s, seq_len=8, micro_batch=3, grad_accum=2, dp_rank=r, dp_world=w, seed=seed)
    a, b = mk(0), mk(0)
    seq_a = [a.next_step() for _ in range(6)]
    b.load_state_dict({"step": 4})  # skip straight to step 4: same batches as iterating there
    for (xa, ya), (xb, yb) in zip(seq_a[4] + seq_a[5], b.next_step() + b.next_step()):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    for (x, y) in seq_a[0]:
        assert x.shape == (3, 8) and np.array_equal(x[:, 1:], y[:, :-1])  # labels are inputs shifted by one
    # ranks read disjoint windows; together they cover an epoch exactly once
    per_rank = [[g for st in range(a.num_windows) for m in range(2) for g in mk(r).samples(st, m)] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    W = a.num_windows
    epoch0 = [int(a._order(0)[g]) for g in sorted(per_rank[0] + per_rank[1]) if g < W]
    assert sorted(epoch0) == list(range(W))
    # another seed, another order
    assert not np.array_equal(mk(0, seed=6).next_step()[0][0], seq_a[0][0][0])


def test_eval_batches_are_fixed(tmp_path):
    s = numbered_stream(tmp_path)
    e1, e2 = eval_batches(s, 8, 4, 2), eval_batches(s, 8, 4, 2)
    assert len(e1) == 2 and all(np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(e1, e2))


def test_too_little_data_for_one_sequence(tmp_path):
    s = TokenStream([write_documents(tmp_path / "t", [[1, 2]], vocab_size=259, eos_id=257, tokenizer="byte")])
    with pytest.raises(ValueError, match="too few for one sequence of seq_len=8"):
        SequenceLoader(s, seq_len=8, micro_batch=1)


@pytest.mark.parametrize("domain", sorted(DOMAINS))
def test_embedded_domains_are_deterministic_and_splits_differ(domain, tmp_path):
    tok = ByteTokenizer()
    a = embedded_path(domain, "val", tok, 20_000, seed=0, cache_dir=tmp_path / "c1")
    b = embedded_path(domain, "val", tok, 20_000, seed=0, cache_dir=tmp_path / "c2")
    t = embedded_path(domain, "train", tok, 20_000, seed=0, cache_dir=tmp_path / "c1")
    ra, rb, rt = (TokenStream([p]).read(0, 20_000) for p in (a, b, t))
    assert np.array_equal(ra, rb)
    assert not np.array_equal(ra[:2000], rt[:2000])
    assert embedded_path(domain, "val", tok, 20_000, seed=0, cache_dir=tmp_path / "c1") == a  # cached


def test_embedded_path_returns_the_folder_another_process_published_meanwhile(tmp_path, monkeypatch):
    """Ranks sharing one cache: one finds no folder, another publishes it before the first writes: the first
    returns the published folder instead of failing."""
    import flexmore.data.embedded as embedded

    real = embedded.write_documents

    def racing(out, docs, **kw):
        docs = list(docs)
        real(out, iter(docs), **kw)  # the other rank, first
        return real(out, iter(docs), **kw)  # this one: the folder exists now

    monkeypatch.setattr(embedded, "write_documents", racing)
    out = embedded_path("math", "val", ByteTokenizer(), 5_000, seed=0, cache_dir=tmp_path)
    assert read_index(out)["num_tokens"] > 0  # the published folder, whole

    def stray(out, docs, **kw):  # a folder is there, but no process published it (no index)
        raise FileExistsError(out)

    monkeypatch.setattr(embedded, "write_documents", stray)
    with pytest.raises(FileExistsError):  # a folder without its index is not a published one
        embedded_path("math", "val", ByteTokenizer(), 6_000, seed=0, cache_dir=tmp_path)


def test_code_domain_files_never_in_both_splits():
    train, val = set(code_domain.source_files("train")), set(code_domain.source_files("val"))
    assert train and val and not train & val


def test_math_answers_follow_from_their_worked_solutions():
    """Each training problem's last solution line ends in the stated answer, and that answer is right."""
    docs = math.documents("train", 0)
    for _ in range(50):
        for block in next(docs).split("Problem: ")[1:]:
            solution = block.split("Solution: ")[1]
            answer = int(re.search(r"Answer: (-?\d+)", solution).group(1))
            steps = re.findall(r"(-?\d+) ([-+*]) (\d+) = (-?\d+)", solution)
            for a, op, b, r in steps:
                assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(r)
            if steps:
                assert int(steps[-1][3]) == answer
            else:  # a linear equation: check x solves it
                a, sign, b, c = re.match(r"Solve for x: (\d+)x ([+-]) (\d+) = (-?\d+)", block).groups()
                assert int(a) * answer + (int(b) if sign == "+" else -int(b)) == int(c)


def test_facts_questions_are_answered_by_the_world_and_stated_in_training_text():
    qa = facts.qa_pairs("val", 30, seed=0)
    train_text = " ".join(itertools.islice(facts.documents("train", 0), 30_000))
    for item in qa:
        assert item["category"] == "knowledge"
        subject = re.search(r"(?:was|of|founded|is) ([A-Z][a-z]+ [A-Z][a-z]+)", item["question"]).group(1)
        sentences = [s for s in re.split(r"(?<=\.) ", train_text) if subject in s]
        assert any(item["answer"] in s for s in sentences), item


def _wording(template: str) -> re.Pattern:
    """A template as a pattern that matches any sentence written in it."""
    name, word = "[A-Z][a-z]+", "[a-z]+"
    slot = {"n": f"{name} {name}", "f": f"{name} {name}", "m": f"{name} {name}", "c": name, "o": name, "y": r"\d+",
            "a": "an?", "j": word, "k": word, "i": word}
    parts = re.split(r"\{(\w)\}", template)  # literal, slot, literal, ...
    return re.compile("^" + "".join(slot[x] if i % 2 else re.escape(x) for i, x in enumerate(parts)) + "$")


def test_facts_validation_wording_is_never_trained_on_and_training_frames_some_sentences():
    lists = [facts.PERSON_T, facts.JOB_T, facts.COLOR_T, facts.COMPANY_T, facts.INDUSTRY_T, facts.CITY_T]
    held = [_wording(t[-1]) for t in lists]
    trained = [_wording(t) for ts in lists for t in ts[:-1]]

    def sentences(split: str, n: int) -> list[str]:
        docs = itertools.islice(facts.documents(split, 0), n)
        return [s for d in docs if not d.startswith("Question:") for s in re.split(r"(?<=\.) (?=[A-Z])", d)]

    val = sentences("val", 300)
    assert val and all(any(w.match(s) for w in held) for s in val)
    train = sentences("train", 3000)
    assert not [s for s in train if any(w.match(s) for w in held)]
    plain = sum(any(w.match(s) for w in trained) for s in train) / len(train)
    assert 1 - plain == pytest.approx(facts.FRAMED, abs=0.03)  # the rest carry a lead or a tail
    for s in train:  # without its lead or tail, a framed sentence is in a training wording
        lead = next((x for x in facts.LEADS if s.startswith(x + " ")), None)
        if lead:
            s = s[len(lead) + 1:]
            s = s[0].upper() + s[1:]
        tail = next((x for x in facts.TAILS if s.endswith(f", {x}.")), None)
        if tail:
            s = s[: -len(tail) - 3] + "."
        assert any(w.match(s) for w in trained), s


def test_unknown_domain_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown embedded domain 'poetry'"):
        embedded_path("poetry", "train", ByteTokenizer(), 10, 0)


def test_prep_cli(tmp_path, capsys):
    from flexmore.cli.prep import main

    src = make_inputs(tmp_path)
    assert main([str(src), "--out", str(tmp_path / "o"), "--field", "body"]) == 0
    assert "wrote" in capsys.readouterr().out and read_index(tmp_path / "o")["num_documents"] == 10
    assert main([str(src), "--out", str(tmp_path / "o"), "--field", "body"]) == 2  # exists: not overwritten
    assert "already exists" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.txt"), "--out", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err
