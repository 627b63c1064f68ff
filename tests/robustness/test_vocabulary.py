"""Vocabulary files that claim absurd sizes."""

import time

from cmhash.text import Vocabulary


def test_anonymous_vocabulary_of_a_billion_columns_costs_nothing_until_used():
    start = time.perf_counter()
    vocab = Vocabulary.from_dict({"format": "cmhash.vocabulary", "rules": Vocabulary.anonymous_of_size(1).rules,
                                  "anonymous_size": 10**9})
    assert time.perf_counter() - start < 1.0  # building a billion names took minutes and ~60 GB
    assert vocab.dim == 10**9 and "#999999999" in vocab and "#1000000000" not in vocab and "#01" not in vocab
    assert vocab.words[5] == "#5" and vocab.index("#42") == 42
    small = Vocabulary.anonymous_of_size(3)
    assert tuple(small.words) == ("#0", "#1", "#2") and small.encode_indices([2]).tolist() == [0, 0, 1]
    assert Vocabulary.from_dict(small.to_dict()).words == small.words
