"""Tokenisation and the bag-of-words vocabulary shared by training and the runtime."""

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cmhash.errors import CmhashError, TextInputError, UnsupportedInputError, VocabularyError
from cmhash.text import DEFAULT_RULES, Vocabulary, check_bow, tokenize

TEXTS = ["A cat on the sofa.", "The dog and the cat", "sofa, sofa! SOFA", "dog_park 2024", ""]


def test_rules_nfkc_lowercase_split_on_non_alphanumerics():
    assert tokenize("Hello, World! it's 2024") == ["hello", "world", "it", "s", "2024"]
    assert tokenize("ＡＢＣ　ﬁsh") == ["abc", "fish"]  # full-width letters and the fi ligature fold
    assert tokenize("snake_case-and.dots") == ["snake", "case", "and", "dots"]
    assert tokenize("Café Straße Москва 東京") == ["café", "straße", "москва", "東京"]
    assert tokenize("cafe\u0301") == ["café"]  # a combining accent composes instead of splitting
    assert tokenize("") == [] and tokenize(" \t\n...") == []


def test_build_counts_documents_and_orders_alphabetically():
    vocab = Vocabulary.build(TEXTS)
    assert vocab.words == ("2024", "a", "and", "cat", "dog", "on", "park", "sofa", "the")
    assert Vocabulary.build(TEXTS, min_count=2).words == ("cat", "dog", "sofa", "the")  # "sofa" x3 in one text counts once
    assert Vocabulary.build(TEXTS, max_size=2).words == ("cat", "dog")  # four words in 2 texts: ties by word
    assert Vocabulary.build(TEXTS + ["the end"], max_size=1).words == ("the",)  # the most frequent
    assert Vocabulary.build(TEXTS, min_count=2).min_count == 2
    with pytest.raises(VocabularyError, match="lower min_count"):
        Vocabulary.build(TEXTS, min_count=10)
    with pytest.raises(ValueError):
        Vocabulary.build(TEXTS, min_count=0)


def test_encode_is_multi_hot_and_drops_unknown_words():
    vocab = Vocabulary.from_words(["cat", "dog", "sofa"])
    assert vocab.encode("Cat, cat and CAT on a sofa; zebra").tolist() == [1.0, 0.0, 1.0]
    assert vocab.encode("cat").dtype == np.float32


def test_empty_and_unknown_texts_are_the_zero_vector():
    vocab = Vocabulary.from_words(["cat", "dog"])
    for text in ("", "   ", "zebra giraffe", [], b""):
        assert vocab.encode(text).tolist() == [0.0, 0.0]


def test_very_long_text():
    vocab = Vocabulary.from_words(["cat", "dog"])
    long_text = "lorem ipsum " * 500_000 + "dog"
    assert len(long_text) > 5_000_000
    assert vocab.encode(long_text).tolist() == [0.0, 1.0]


def test_tag_lists_go_through_the_same_rules():
    vocab = Vocabulary.from_words(["cat", "new", "york"])
    assert vocab.encode(["New York", "CAT"]).tolist() == vocab.encode("new york cat").tolist() == [1, 1, 1]
    assert vocab.encode(("cat",)).tolist() == [1, 0, 0]
    with pytest.raises(UnsupportedInputError, match="tags must be str"):
        vocab.encode(["cat", 3])


def test_utf8_bytes_accepted_and_other_bytes_refused():
    vocab = Vocabulary.from_words(["café"])
    assert vocab.encode("café".encode()).tolist() == [1.0]
    with pytest.raises(TextInputError, match="not valid UTF-8"):
        vocab.encode("café".encode("latin-1"))
    with pytest.raises(ValueError):  # the builtin a caller would catch
        vocab.encode(b"\xff\xfe\x00")
    with pytest.raises(TextInputError, match="not valid Unicode"):
        vocab.encode(b"caf\xe9".decode("utf-8", errors="surrogateescape"))
    with pytest.raises(UnsupportedInputError):
        vocab.encode(42)
    with pytest.raises(TypeError):
        vocab.encode(None)


def test_encode_batch_texts_tags_and_bow_arrays():
    vocab = Vocabulary.from_words(["cat", "dog", "sofa"])
    out = vocab.encode_batch(["cat", ["dog", "sofa"], "", b"sofa"])
    assert out.dtype == np.float32 and out.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0], [0, 0, 1]]
    assert vocab.encode_batch([]).shape == (0, 3)
    bow = np.array([[1, 0, 1], [0, 0, 0]], dtype=np.uint8)
    assert vocab.encode_batch(bow).tolist() == bow.tolist() and vocab.encode_batch(bow).dtype == np.float32
    with pytest.raises(TextInputError, match=r"shape \(n, 3\)"):
        vocab.encode_batch(np.zeros((2, 4)))
    with pytest.raises(TextInputError, match="only 0 and 1"):
        vocab.encode_batch(np.array([[2.0, 0, 0]]))
    with pytest.raises(UnsupportedInputError, match="use encode"):
        vocab.encode_batch("cat dog")


def test_check_bow_refuses_nan_and_accepts_bool():
    assert check_bow(np.array([True, False]), 2).tolist() == [[1.0, 0.0]]
    with pytest.raises(TextInputError):
        check_bow(np.array([[np.nan, 0.0]]), 2)
    with pytest.raises(TextInputError, match="numeric"):
        check_bow(np.array([["a", "b"]]), 2)


def test_json_round_trip_keeps_words_rules_and_fingerprint(tmp_path):
    vocab = Vocabulary.build(TEXTS + ["東京 Москва"], min_count=1)
    path = vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.fingerprint == vocab.fingerprint and loaded.min_count == 1
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["rules"] == DEFAULT_RULES and data["words"] == list(vocab.words)
    assert "東京" in path.read_text(encoding="utf-8")  # stored readable, not \u-escaped
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temporary file left behind


def test_fingerprint_changes_with_words_order_and_rules():
    base = Vocabulary.from_words(["cat", "dog"])
    assert base.fingerprint == Vocabulary.from_words(["cat", "dog"]).fingerprint
    assert len(base.fingerprint) == 64
    others = [
        Vocabulary.from_words(["dog", "cat"]),
        Vocabulary.from_words(["cat", "dogs"]),
        Vocabulary.from_words(["cat", "dog"], rules={**DEFAULT_RULES, "normalization": "NFC"}),
    ]
    assert len({base.fingerprint, *(v.fingerprint for v in others)}) == 4


def test_words_that_could_never_match_are_refused():
    with pytest.raises(VocabularyError, match="not one term"):
        Vocabulary.from_words(["new york"])
    with pytest.raises(VocabularyError, match="not one term"):
        Vocabulary.from_words(["Cat"])  # lower-cased text can never produce it
    with pytest.raises(VocabularyError, match="twice"):
        Vocabulary.from_words(["cat", "dog", "cat"])
    with pytest.raises(VocabularyError, match="at least one"):
        Vocabulary.from_words([])


def test_bad_vocabulary_files(tmp_path):
    bad = tmp_path / "bad.json"
    for content in (b"\xff\xfe not json", b"[1, 2]", b'{"format": "other"}', b'{"format": "cmhash.vocabulary"}'):
        bad.write_bytes(content)
        with pytest.raises(VocabularyError):
            Vocabulary.load(bad)
    future = Vocabulary.from_words(["cat"]).to_dict()
    future["rules"]["version"] = 2
    with pytest.raises(VocabularyError, match="upgrade"):
        Vocabulary.from_dict(future)
    assert issubclass(VocabularyError, CmhashError) and issubclass(TextInputError, ValueError)


@given(st.lists(st.text(max_size=12), max_size=8), st.text(max_size=80))
def test_encode_marks_exactly_the_known_tokens(vocab_texts, text):
    words = sorted({w for t in vocab_texts for w in tokenize(t)}) or ["x"]
    vocab = Vocabulary.from_words(words)
    expected = np.array([w in set(tokenize(text)) for w in words], dtype=np.float32)
    assert np.array_equal(vocab.encode(text), expected)
    assert np.array_equal(vocab.encode(text.split()), expected)


# --- n-grams and anonymous vocabularies (what the training data layer builds) -----------------

BIGRAMS = {**DEFAULT_RULES, "ngram_max": 2}


def test_bigrams_tell_word_order_apart():
    assert tokenize("Red circle above", BIGRAMS) == ["red", "circle", "above", "red circle", "circle above"]
    vocab = Vocabulary.build(["a red circle above a blue square"], ngram_max=2)
    assert {"red circle", "blue square", "above a"} <= set(vocab.words)
    assert (vocab.encode("a red circle above a blue square") != vocab.encode("a blue circle above a red square")).any()


def test_bigrams_never_span_two_tags():
    vocab = Vocabulary(["new", "york", "new york", "york city"], rules=BIGRAMS)
    assert vocab.encode(["new york", "city"]).tolist() == [1, 1, 1, 0]
    assert vocab.encode("new york city").tolist() == [1, 1, 1, 1]
    assert vocab.columns(["York", "new york"]).tolist() == [0, 1, 2]


def test_a_term_longer_than_the_rules_allow_is_refused():
    with pytest.raises(VocabularyError, match="not one term"):
        Vocabulary(["new york"])  # unigram rules: a two-word term could never match
    with pytest.raises(VocabularyError, match="ngram_max"):
        Vocabulary(["a"], rules={**DEFAULT_RULES, "ngram_max": 0})


def test_ngram_vocabulary_round_trips_with_its_rules(tmp_path):
    vocab = Vocabulary.build(["ä red circle above a blue square"], ngram_max=2)
    loaded = Vocabulary.load(vocab.save(tmp_path / "vocab.json"))
    assert loaded == vocab and loaded.rules["ngram_max"] == 2 and loaded.fingerprint == vocab.fingerprint
    assert loaded.encode("a blue circle").tolist() == vocab.encode("a blue circle").tolist()


def test_anonymous_vocabulary_takes_tag_indices_only(tmp_path):
    vocab = Vocabulary.anonymous_of_size(5)
    assert vocab.anonymous and vocab.dim == 5
    assert vocab.encode_indices([0, 3, 3]).tolist() == [1, 0, 0, 1, 0]
    with pytest.raises(TextInputError, match="bag-of-words vectors or tag indices"):
        vocab.encode("a word")
    with pytest.raises(TextInputError, match=r"\[0, 5\)"):
        vocab.encode_indices([5])
    loaded = Vocabulary.load(vocab.save(tmp_path / "v.json"))
    assert loaded.anonymous and loaded == vocab and "#0" not in json.loads((tmp_path / "v.json").read_text()).get("words", [])
    with pytest.raises(VocabularyError, match="positive"):
        Vocabulary.anonymous_of_size(0)
