"""FlatParams: layout, alignment, views, construction from arrays, selection."""

import doctest

import numpy as np
import pytest

import fastopt as fo
import fastopt.flat
from fastopt.flat import FlatLayout, FlatParams, FlatSelection, aligned_zeros

SHAPES = {"w1": (5, 3), "b1": (3,), "w2": (3, 2), "b2": 2, "scalar": (), "empty": (0, 4), "w3": (7,)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("align", [None, 8, 64, 256])
def test_layout_is_aligned_and_views_cover_disjoint_spans(dtype, align):
    kw = {} if align is None else {"align": align}
    itemsize = np.dtype(dtype).itemsize
    if align is not None and align < itemsize:
        pytest.skip("alignment below the item size is an error (tested below)")
    flat = FlatParams(SHAPES, dtype, **kw)
    a = align or 64
    assert flat.buffer.ctypes.data % a == 0
    assert flat.buffer.size % (a // itemsize) == 0
    assert flat.buffer.flags.c_contiguous and flat.buffer.flags.writeable
    covered = np.zeros(flat.buffer.size, int)
    end = 0
    for name, shape in SHAPES.items():
        shape = (shape,) if isinstance(shape, int) else shape
        view = flat[name]
        assert view.shape == shape and view.dtype == dtype
        assert view.size == 0 or view.ctypes.data % a == 0
        assert view.size == 0 or np.shares_memory(view, flat.buffer)
        span = flat.layout.span(name)
        assert span.start >= end  # buffer order, no overlap
        end = span.stop
        covered[span] += 1
    assert covered.max() == 1
    assert np.array_equal(covered == 0, flat.layout.padding_mask())
    assert flat.numel == int(covered.sum()) == 15 + 3 + 6 + 2 + 1 + 0 + 7


def test_offsets_of_a_small_example():
    flat = FlatParams({"a": 5, "b": (2, 2), "c": 17}, np.float32)  # 16 floats per 64 bytes
    assert flat.layout.offsets == (0, 16, 32)
    assert flat.buffer.size == 64
    flat64 = FlatParams({"a": 5, "b": (2, 2), "c": 17}, np.float64)  # 8 doubles per 64 bytes
    assert flat64.layout.offsets == (0, 8, 16)
    assert flat64.buffer.size == 40


def test_views_write_the_buffer_and_padding_stays_zero():
    flat = FlatParams(SHAPES)
    for i, name in enumerate(flat):
        flat[name][...] = i + 1
    for i, name in enumerate(flat):
        assert np.all(flat.buffer[flat.layout.span(name)] == i + 1)
    assert np.all(flat.buffer[flat.layout.padding_mask()] == 0)


def test_mapping_protocol_and_order():
    flat = FlatParams([("z", 2), ("a", 3)])
    assert list(flat) == ["z", "a"] == list(flat.names)
    assert len(flat) == 2 and "a" in flat and "q" not in flat
    assert set(dict(flat)) == {"z", "a"}
    with pytest.raises(KeyError, match="no tensor named 'q'"):
        flat["q"]
    same = flat
    assert flat != flat.copy() and flat == same  # identity, not element-wise


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_from_arrays_copies_values_in(dtype):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.standard_normal((4, 3)).astype(dtype), "b": rng.standard_normal(3).astype(dtype)}
    flat = FlatParams.from_arrays(arrays)
    assert flat.dtype == dtype
    for name, a in arrays.items():
        np.testing.assert_array_equal(flat[name], a)
        assert not np.shares_memory(flat[name], a)
    arrays["w"][...] = 0  # the originals are not referenced
    assert np.any(flat["w"] != 0)


def test_from_arrays_dtype_rules():
    with pytest.raises(TypeError, match="pass dtype="):
        FlatParams.from_arrays({"a": np.zeros(2, np.float32), "b": np.zeros(2, np.float64)})
    with pytest.raises(TypeError, match="pass dtype="):
        FlatParams.from_arrays({"a": np.arange(3)})
    flat = FlatParams.from_arrays({"a": np.arange(3), "b": np.ones(2, np.float64)}, dtype=np.float32)
    assert flat.dtype == np.float32
    np.testing.assert_array_equal(flat["a"], [0, 1, 2])


def test_zeros_like_and_copy_share_the_layout_not_the_memory():
    flat = FlatParams.from_arrays({"w": np.ones((3, 3), np.float32), "b": np.ones(3, np.float32)})
    grads = flat.zeros_like()
    assert grads.layout is flat.layout
    assert not np.shares_memory(grads.buffer, flat.buffer)
    assert np.all(grads.buffer == 0)
    assert grads.buffer.ctypes.data % flat.layout.align == 0
    snap = flat.copy()
    np.testing.assert_array_equal(snap.buffer, flat.buffer)
    flat["w"][...] = 5
    assert np.all(snap["w"] == 1)


def test_from_layout_wraps_a_buffer_without_copying():
    flat = FlatParams({"w": (2, 2), "b": 2})
    buf = aligned_zeros(flat.layout.size, np.float32)
    other = FlatParams.from_layout(flat.layout, buf)
    other["b"][...] = 3
    assert np.all(buf[flat.layout.span("b")] == 3)
    with pytest.raises(ValueError, match="shape"):
        FlatParams.from_layout(flat.layout, np.zeros(flat.layout.size + 1, np.float32))
    with pytest.raises(TypeError, match="dtype"):  # a wrong dtype is a TypeError, as everywhere
        FlatParams.from_layout(flat.layout, np.zeros(flat.layout.size, np.float64))
    with pytest.raises(TypeError, match="FlatLayout"):
        FlatParams.from_layout({"w": 2})


def test_layouts_compare_by_value():
    a = FlatLayout.build({"w": (2, 3), "b": 3})
    assert a == FlatLayout.build({"w": (2, 3), "b": 3})
    assert a != FlatLayout.build({"w": (3, 2), "b": 3})
    assert a != FlatLayout.build({"w": (2, 3), "b": 3}, np.float64)
    assert a != FlatLayout.build({"w": (2, 3), "b": 3}, align=128)


def test_select_by_name_and_glob_in_buffer_order():
    flat = FlatParams({"enc.w": 2, "enc.b": 2, "dec.w": 2, "dec.b": 2, "head[0]": 1})
    sel = flat.select("*.b", "enc.*")
    assert isinstance(sel, FlatSelection)
    assert sel.names == ("enc.w", "enc.b", "dec.b")  # buffer order, each once
    assert sel.flat is flat
    assert [v.base is not None for v in sel] == [True] * 3
    assert all(np.shares_memory(v, flat[n]) for v, n in zip(sel, sel.names))
    assert flat.select("head[0]").names == ("head[0]",)  # an exact name wins over glob syntax
    assert flat.select("*", exclude="*.b").names == ("enc.w", "dec.w", "head[0]")
    assert flat.select("*", exclude=["*.b", "head*"]).names == ("enc.w", "dec.w")
    assert len(sel) == 3 and sel[1] is flat["enc.b"]
    assert sel[1:].names == ("enc.b", "dec.b")


def test_select_rejects_patterns_that_match_nothing():
    flat = FlatParams({"w": 2, "b": 2})
    with pytest.raises(ValueError, match="'x\\*' matches no tensor"):
        flat.select("w", "x*")
    with pytest.raises(ValueError, match="matches no tensor"):
        flat.select("*", exclude="nope")
    with pytest.raises(TypeError, match="at least one pattern"):
        flat.select()
    with pytest.raises(TypeError, match="strings"):
        flat.select(3)


@pytest.mark.parametrize(
    "shapes, kwargs, exc, match",
    [
        ({"w": (2, -1)}, {}, ValueError, "integers >= 0"),
        ({"w": (2, 1.5)}, {}, ValueError, "integers >= 0"),
        ({"w": "ab"}, {}, ValueError, "integers >= 0"),
        ({"w": None}, {}, TypeError, "int or a sequence"),
        ({"": 2}, {}, TypeError, "non-empty strings"),
        ({3: 2}, {}, TypeError, "non-empty strings"),
        ([("a", 2), ("a", 3)], {}, ValueError, "duplicate tensor name"),
        ([("a", 2, 3)], {}, TypeError, "pairs"),
        ({"w": 2}, {"dtype": np.int32}, TypeError, "float32 or float64"),
        ({"w": 2}, {"dtype": np.float16}, TypeError, "float32 or float64"),
        ({"w": 2}, {"align": 48}, ValueError, "power of two"),
        ({"w": 2}, {"align": 2}, ValueError, "power of two"),
        ({"w": 2}, {"align": 64.0}, TypeError, "align must be an int"),
    ],
)
def test_bad_construction_is_a_clear_error(shapes, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FlatParams(shapes, **kwargs)


def test_exported_and_docstring_examples_run():
    assert fo.FlatParams is FlatParams
    result = doctest.testmod(fastopt.flat, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_repr_mentions_size():
    assert "3 tensors" in repr(FlatParams({"a": 1, "b": 2, "c": (2, 2)}))
    assert "2 of 3" in repr(FlatParams({"a": 1, "b": 2, "c": 3}).select("a", "b"))
