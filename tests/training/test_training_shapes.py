import numpy as np
import pytest

from cmhash.training.data import SHAPES_LABEL_NAMES, captions, make_shapes
from cmhash.training.data.shapes import COLOURS, RELATIONS, SHAPES
from cmhash.training.errors import DataError


def _pixels(data, i):
    return np.asarray(data.images.load(i))


def test_deterministic_from_seed_and_index():
    a, b, c = make_shapes(12, seed=5), make_shapes(12, seed=5), make_shapes(12, seed=6)
    assert captions(a) == captions(b)
    np.testing.assert_array_equal(a.labels, b.labels)
    for i in range(12):
        np.testing.assert_array_equal(_pixels(a, i), _pixels(b, i))
    assert captions(a) != captions(c)
    # sample i does not depend on how many samples were drawn
    longer = make_shapes(30, seed=5)
    assert captions(longer)[:12] == captions(a)
    np.testing.assert_array_equal(_pixels(longer, 7), _pixels(a, 7))


def test_labels_match_captions_and_pixels():
    data = make_shapes(200, seed=1)
    assert data.label_names == SHAPES_LABEL_NAMES and len(SHAPES_LABEL_NAMES) == 12
    palette = np.array(list(COLOURS.values()), dtype=np.float32)
    singles = 0
    for i, (caption, scene) in enumerate(zip(captions(data), data.images.scenes)):
        words = caption.split()
        named = {f"{words[k]} {words[k + 1]}" for k in range(len(words) - 1) if words[k] in COLOURS and words[k + 1] in SHAPES}
        assert named == {SHAPES_LABEL_NAMES[j] for j in np.flatnonzero(data.labels[i])}
        singles += len(scene.shapes) == 1
        pixels = _pixels(data, i).astype(np.float32)
        for s in scene.shapes:  # the pixels at each shape's centre have that shape's colour
            patch = pixels[int(s.cy) - 1 : int(s.cy) + 2, int(s.cx) - 1 : int(s.cx) + 2].reshape(-1, 3).mean(0)
            assert list(COLOURS)[np.argmin(((palette - patch) ** 2).sum(1))] == s.colour
        if len(scene.shapes) == 2:  # the caption's relation holds for the shapes it names, in its order
            first, second = (s for name in (f"{words[1]} {words[2]}", f"{words[-2]} {words[-1]}")
                             for s in scene.shapes if f"{s.colour} {s.shape}" == name)
            relation = " ".join(words[3:-3])
            assert relation in RELATIONS
            gap = {"above": second.cy - first.cy, "below": first.cy - second.cy,
                   "left of": second.cx - first.cx, "right of": first.cx - second.cx}[relation]
            assert gap >= first.half + second.half  # wholly on their sides, no overlap
    assert 30 < singles < 100  # about 30 % single shapes


def test_bigram_text_binds_colour_to_shape():
    data = make_shapes(300, seed=2)
    vocab = data.build_vocabulary(range(300))
    assert vocab.rules["ngram_max"] == 2 and "red circle" in vocab.words and "above a" in vocab.words
    data = data.with_vocabulary(vocab)
    # two captions with the same words but swapped colours differ in their bags of words
    a = vocab.encode("a red circle above a blue square")
    b = vocab.encode("a blue circle above a red square")
    assert (a != b).any()
    i = int(np.flatnonzero(data.labels.sum(1) == 1)[0])
    assert data.text(i)[vocab.words.index(SHAPES_LABEL_NAMES[int(np.flatnonzero(data.labels[i])[0])])] == 1


def test_bad_arguments():
    with pytest.raises(DataError):
        make_shapes(0)
    with pytest.raises(DataError):
        make_shapes(10, image_size=8)
