"""Packing, unpacking and the bit order shared with FAISS and bitarray."""

import numpy as np
import pytest
from bitarray import bitarray
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cmhash
from cmhash import CodeFormatError, from_bitarrays, pack_codes, to_bitarrays, unpack_codes


def test_bit_order_is_lsb_first():
    # bit i of a code is bit i % 8 of byte i // 8
    code = -np.ones(16)
    code[0] = code[9] = 1
    assert pack_codes(code).tolist() == [0b00000001, 0b00000010]


@pytest.mark.parametrize("bits", [8, 16, 64, 136, 1024])
def test_same_bytes_as_faiss(bits):
    faiss = pytest.importorskip("faiss")
    n = 7
    x = np.random.default_rng(bits).standard_normal((n, bits)).astype(np.float32)
    x[0, :3] = 0.0  # fvecs2bitvecs, like cmhash, counts 0 as +1 (real_to_binary does not)
    theirs = np.zeros((n, bits // 8), dtype=np.uint8)
    faiss.fvecs2bitvecs(faiss.swig_ptr(x), faiss.swig_ptr(theirs), bits, n)
    assert np.array_equal(pack_codes(x), theirs)
    back = np.zeros((1, bits), dtype=np.float32)
    faiss.binary_to_real(bits, faiss.swig_ptr(theirs[1].copy()), faiss.swig_ptr(back))
    assert np.array_equal(unpack_codes(theirs[1], signed=True)[0], back[0])


def test_faiss_search_on_our_codes_matches_bit_counts():
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    db = pack_codes(rng.standard_normal((50, 64)))
    q = pack_codes(rng.standard_normal((3, 64)))
    index = faiss.IndexBinaryFlat(64)
    index.add(db)
    dist, _ = index.search(q, 50)
    brute = np.unpackbits(q[:, None] ^ db[None], axis=2).sum(2)
    assert np.array_equal(np.sort(dist, axis=1), np.sort(brute, axis=1))


@pytest.mark.parametrize(
    "values, expected",
    [
        (np.array([[1, -1, 1, -1, 1, -1, 1, -1]]), [0b01010101]),  # ±1
        (np.array([[1, 0, 1, 0, 1, 0, 1, 0]]), [0b01010101]),  # 0/1
        (np.array([[True, False] * 4]), [0b01010101]),  # bool
        (np.array([[0.3, -2, 0.0, -1e-9, 5, -0.1, 1e-9, -3]]), [0b01010101]),  # real, 0 -> +1
    ],
)
def test_pack_inputs(values, expected):
    assert pack_codes(values).tolist() == [expected]


def test_auto_reads_the_whole_array_not_only_the_first_row():
    # first row 0/1, a later row ±1: the array is signs, so 0 counts as +1 everywhere
    codes = np.array([[1, 0, 0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0, 0, -1]])
    assert pack_codes(codes).tolist() == [[255], [127]]
    assert pack_codes(codes[:1]).tolist() == [[0b10000001]]


def test_zero_counts_as_plus_one_with_sign_input():
    assert pack_codes(np.zeros((1, 8)), input="sign").tolist() == [[255]]
    assert pack_codes(np.zeros((1, 8)), input="binary").tolist() == [[0]]


def test_unpack_signed_and_bits():
    packed = np.array([[0b10000001]], dtype=np.uint8)
    assert unpack_codes(packed).tolist() == [[1, 0, 0, 0, 0, 0, 0, 1]]
    assert unpack_codes(packed, signed=True).tolist() == [[1, -1, -1, -1, -1, -1, -1, 1]]
    with pytest.raises(CodeFormatError, match="does not match"):
        unpack_codes(packed, bits=16)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.int8,
        st.tuples(st.integers(0, 20), st.integers(1, 40).map(lambda b: 8 * b)),
        elements=st.sampled_from([-1, 1]),
    )
)
def test_roundtrip_property(signs):
    packed = pack_codes(signs, input="sign")
    assert packed.shape == (signs.shape[0], signs.shape[1] // 8)
    assert np.array_equal(unpack_codes(packed, signed=True), signs)


@settings(max_examples=40, deadline=None)
@given(hnp.arrays(np.uint8, st.tuples(st.integers(0, 10), st.integers(1, 20))))
def test_bitarray_roundtrip_property(packed):
    if packed.shape[0] == 0:
        return
    bas = to_bitarrays(packed)
    assert all(ba.endian == "little" and len(ba) == packed.shape[1] * 8 for ba in bas)
    assert np.array_equal(from_bitarrays(bas), packed)
    # bitarray indexes bits in the code's own order
    bits = unpack_codes(packed)
    assert [list(ba) for ba in bas] == bits.tolist()


def test_from_bitarrays_converts_big_endian_by_bit_meaning():
    ba = bitarray("10000000" "00000001", endian="big")
    assert from_bitarrays([ba]).tolist() == [[0b00000001, 0b10000000]]


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones((2, 12)), "multiple of 8"),
        (np.ones((2, 0)), "multiple of 8"),
        (np.ones((2, 2, 8)), "1-D or 2-D"),
        (np.array([[np.nan] * 8]), "NaN"),
        (np.array([["a"] * 8]), "numeric"),
        (np.array([[7] * 8], dtype=np.uint8), "unsigned"),
    ],
)
def test_pack_bad_input(bad, match):
    with pytest.raises(CodeFormatError, match=match):
        pack_codes(bad)


def test_binary_input_rejects_signs():
    with pytest.raises(CodeFormatError, match="0/1"):
        pack_codes(np.array([[-1, 1] * 4]), input="binary")


def test_from_bitarrays_errors():
    with pytest.raises(CodeFormatError, match="no codes"):
        from_bitarrays([])
    with pytest.raises(CodeFormatError, match="item 1"):
        from_bitarrays([bitarray(8), bitarray(16)])
    with pytest.raises(TypeError, match="not bitarray"):
        from_bitarrays([b"\x00"])


def test_unpack_refuses_to_guess_dtype():
    with pytest.raises(CodeFormatError, match="pack_codes"):
        unpack_codes(np.ones((2, 8), dtype=np.float32))


def test_import_is_light():
    import subprocess
    import sys

    code = "import sys, cmhash; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert cmhash.__version__
