import numpy as np
import pytest

from cmhash.training.data import Vocabulary, tokenize
from cmhash.training.errors import DataError


def test_tokenizer_rules():
    assert tokenize("A Red-circle, ABOVE the_blue  square!") == ["a", "red", "circle", "above", "the", "blue", "square"]
    assert tokenize("Ｆｕｌｌ width") == ["full", "width"]  # NFKC folds full-width letters
    assert tokenize("red circle above", ngram_max=2) == ["red", "circle", "above", "red circle", "circle above"]


def test_build_min_count_and_order():
    docs = [tokenize(t) for t in ["dog on beach", "dog dog park", "cat on sofa", "dog"]]
    vocab = Vocabulary.build(docs, min_count=2)
    # document frequency: dog 3, on 2; ties alphabetical; singletons dropped
    assert vocab.terms == ["dog", "on"]
    np.testing.assert_array_equal(vocab.encode("Dog and cat on the DOG"), [1.0, 1.0])
    assert vocab.encode("nothing known").sum() == 0  # unknown words are dropped, all-zero is legal
    with pytest.raises(DataError, match="min_count"):
        Vocabulary.build(docs, min_count=5)


def test_tags_are_tokenised_separately():
    vocab = Vocabulary(["new", "york", "new york", "york city"], ngram_max=2)
    np.testing.assert_array_equal(vocab.encode(tags=["new york", "city"]), [1, 1, 1, 0])
    np.testing.assert_array_equal(vocab.encode(text="new york city"), [1, 1, 1, 1])


def test_save_load_round_trip(tmp_path):
    vocab = Vocabulary.build([tokenize("ä red circle above a blue square", 2)], ngram_max=2)
    path = tmp_path / "vocab.json"
    vocab.save(path)
    loaded = Vocabulary.load(path)
    assert loaded == vocab and loaded.terms == vocab.terms and loaded.ngram_max == 2
    np.testing.assert_array_equal(loaded.encode("a blue circle"), vocab.encode("a blue circle"))


def test_anonymous_vocabulary_encodes_indices_only(tmp_path):
    vocab = Vocabulary.anonymous(5)
    np.testing.assert_array_equal(vocab.encode_indices([0, 3, 3]), [1, 0, 0, 1, 0])
    with pytest.raises(DataError, match="indices"):
        vocab.encode("a word")
    with pytest.raises(DataError, match=r"\[0, 5\)"):
        vocab.encode_indices([5])
    vocab.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").anonymous


def test_load_rejects_foreign_json(tmp_path):
    path = tmp_path / "v.json"
    path.write_text('{"terms": ["a"]}')
    with pytest.raises(DataError, match="not a cmhash vocabulary"):
        Vocabulary.load(path)
