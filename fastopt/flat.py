"""Flat parameter buffers: many named tensors in one contiguous array.

A model with hundreds of small tensors costs hundreds of kernel launches per step when each
tensor is its own array. :class:`FlatParams` keeps them all in one buffer and hands out named
views of it, so an optimizer given a ``FlatParams`` updates the whole model in one launch::

    import numpy as np
    import fastopt as fo

    flat = fo.FlatParams({"w1": (784, 256), "b1": 256, "w2": (256, 10), "b2": 10})
    flat["w1"][...] = np.random.randn(784, 256) * 0.05   # views: write in place
    grads = flat.zeros_like()                             # same layout, for gradients
    opt = fo.Adam([{"params": flat.select("w*"), "weight_decay": 1e-2},
                   {"params": flat.select("b*"), "weight_decay": 0.0}], lr=1e-3)
    opt.step(grads)                                       # one launch, both groups

Each tensor starts at a multiple of ``align`` bytes (64 by default, one cache line and one
AVX-512 vector), so vector loops over every tensor start aligned. The gaps between tensors
are padding: zero-filled, never part of any view, and never changed by an optimizer.
"""

from __future__ import annotations

import fnmatch
import numbers
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from ._validation import FLOAT_DTYPES, check_array_type, flat_view

#: Default alignment of every tensor in a flat buffer, in bytes.
DEFAULT_ALIGN = 64

ShapeLike = int | Sequence[int]


def _shape(name: str, shape) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape of {name!r} must be an int or a sequence of ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 0:
            raise ValueError(f"shape of {name!r} must hold integers >= 0, got {shape!r}")
    return tuple(int(d) for d in dims)


def _index_value(what: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


def _check_dtype(dtype) -> np.dtype:
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32 or float64, got {dt}")
    return dt


def _check_align(align, dtype: np.dtype) -> int:
    if isinstance(align, bool) or not isinstance(align, numbers.Integral):
        raise TypeError(f"align must be an int (bytes), got {align!r}")
    align = int(align)
    if align < dtype.itemsize or align & (align - 1):
        raise ValueError(f"align must be a power of two >= the item size ({dtype.itemsize} bytes), got {align}")
    return align


def aligned_zeros(size: int, dtype, align: int = DEFAULT_ALIGN) -> np.ndarray:
    """A zero-filled 1-D array of ``size`` elements whose first element is ``align``-byte aligned.

    Parameters
    ----------
    size : int
        Number of elements.
    dtype : dtype-like
        Element type.
    align : int
        Alignment of the first element in bytes (a power of two).

    Returns
    -------
    numpy.ndarray
        C-contiguous and writable; its ``base`` is a slightly larger byte buffer.
    """
    dtype = np.dtype(dtype)
    nbytes = size * dtype.itemsize
    raw = np.zeros(nbytes + align, dtype=np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start : start + nbytes].view(dtype)


def _is_device(buffer) -> bool:
    from ._backend import is_device_array

    return not isinstance(buffer, np.ndarray) and is_device_array(buffer)


@dataclass(frozen=True)
class FlatLayout:
    """Where each named tensor lives in a flat buffer. Immutable, shared by buffers alike,
    and checked when made (see ``__post_init__``), so a hand-built layout is as safe as a built one.

    Two buffers with equal layouts hold the same tensors at the same offsets: a gradient
    made by :meth:`FlatParams.zeros_like` has its parameters' layout.

    Attributes
    ----------
    names : tuple of str
        Tensor names, in buffer order.
    shapes : tuple of tuple of int
        Their shapes.
    offsets : tuple of int
        Element offset of each tensor in the buffer; each is a multiple of
        ``align // dtype.itemsize``.
    size : int
        Length of the buffer in elements, padding included (a multiple of the alignment).
    dtype : numpy.dtype
        float32 or float64.
    align : int
        Alignment of every tensor, in bytes.
    """

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int
    dtype: np.dtype
    align: int
    _index: dict = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self):
        """Check and normalise a layout however it was made (:meth:`build`, or by hand, as
        :meth:`FlatParams.from_layout` accepts): float dtype, power-of-two alignment, unique
        non-empty names, one shape and one aligned offset per name, tensors in buffer order
        without overlap, all inside ``size`` elements. TypeError or ValueError otherwise."""
        dtype = _check_dtype(self.dtype)
        align = _check_align(self.align, dtype)
        fields = {}
        for attr in ("names", "shapes", "offsets"):
            value = getattr(self, attr)
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
                raise TypeError(f"FlatLayout {attr} must be a sequence, got {type(value).__name__}")
            fields[attr] = tuple(value)
        names, shapes, offsets = fields["names"], fields["shapes"], fields["offsets"]
        if not len(names) == len(shapes) == len(offsets):
            raise ValueError(f"FlatLayout has {len(names)} names, {len(shapes)} shapes and {len(offsets)} offsets; "
                             "it needs one shape and one offset per name")
        for name in names:
            if not isinstance(name, str) or not name:
                raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate tensor name(s): {', '.join(map(repr, dup))}")
        shapes = tuple(_shape(name, shape) for name, shape in zip(names, shapes))
        size = _index_value("FlatLayout size", self.size)
        step = align // dtype.itemsize
        end = 0  # where the previous tensor ends
        checked = []
        for name, shape, offset in zip(names, shapes, offsets):
            offset = _index_value(f"offset of {name!r}", offset)
            if offset % step:
                raise ValueError(f"offset of {name!r} is {offset}, not a multiple of {step} elements "
                                 f"({align}-byte alignment)")
            if offset < end:
                raise ValueError(f"tensor {name!r} at offset {offset} overlaps or precedes the one before it, "
                                 f"which ends at {end}; offsets must be in buffer order without overlap")
            end = offset + int(np.prod(shape, dtype=np.int64))
            if end > size:
                raise ValueError(f"tensor {name!r} ends at element {end}, past the buffer's size {size}")
            checked.append(offset)
        for attr, value in (("names", names), ("shapes", shapes), ("offsets", tuple(checked)), ("size", size),
                            ("dtype", dtype), ("align", align)):
            object.__setattr__(self, attr, value)
        object.__setattr__(self, "_index", {name: i for i, name in enumerate(names)})

    @classmethod
    def build(cls, shapes: Mapping[str, ShapeLike] | Iterable[tuple[str, ShapeLike]], dtype=np.float32,
              align: int = DEFAULT_ALIGN) -> FlatLayout:
        """Lay out tensors of the given shapes one after another, each start aligned.

        Parameters
        ----------
        shapes : mapping or iterable of (name, shape) pairs
            Names (non-empty strings) and shapes (an int or a tuple of ints), in buffer order.
        dtype : dtype-like
            float32 or float64.
        align : int
            Alignment of each tensor in bytes: a power of two, at least the item size.
        """
        dtype = _check_dtype(dtype)
        align = _check_align(align, dtype)
        items = list(shapes.items()) if isinstance(shapes, Mapping) else list(shapes)
        step = align // dtype.itemsize
        names, dims, offsets = [], [], []
        offset = 0
        for item in items:
            try:
                name, shape = item
            except (TypeError, ValueError):
                raise TypeError(f"expected (name, shape) pairs, got {item!r}") from None
            if not isinstance(name, str) or not name:
                raise TypeError(f"tensor names must be non-empty strings, got {name!r}")
            shape = _shape(name, shape)
            names.append(name)
            dims.append(shape)
            offsets.append(offset)
            size = int(np.prod(shape, dtype=np.int64))
            offset += -(-size // step) * step
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate tensor name(s): {', '.join(map(repr, dup))}")
        return cls(tuple(names), tuple(dims), tuple(offsets), offset, dtype, align)

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of elements of each tensor."""
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @property
    def numel(self) -> int:
        """Number of parameter elements, padding excluded."""
        return sum(self.sizes)

    def index(self, name: str) -> int:
        """Position of tensor ``name`` in buffer order (``KeyError`` if absent)."""
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in this layout") from None

    def span(self, name: str) -> slice:
        """The slice of the flat buffer that holds tensor ``name`` (padding excluded)."""
        i = self.index(name)
        start = self.offsets[i]
        return slice(start, start + int(np.prod(self.shapes[i], dtype=np.int64)))

    def padding_mask(self) -> np.ndarray:
        """A boolean array over the buffer, ``True`` at padding elements."""
        mask = np.ones(self.size, dtype=bool)
        for start, size in zip(self.offsets, self.sizes):
            mask[start : start + size] = False
        return mask


def host_gradient_buffer(grads, layout: FlatLayout, params: np.ndarray, where: str = "step()") -> np.ndarray:
    """The 1-D host buffer of a gradient for parameters laid out by ``layout``: ``grads`` is a
    FlatParams with that layout (``flat.zeros_like()``) or its buffer. Raises TypeError or
    ValueError, naming the problem, for anything else or a buffer that shares memory with
    ``params``."""
    if isinstance(grads, FlatParams):
        if grads.layout is not layout and grads.layout != layout:
            raise ValueError("the gradient FlatParams has a different layout from the parameters; "
                             "make gradients with flat.zeros_like()")
        g = grads.buffer
    elif isinstance(grads, np.ndarray):
        check_array_type(grads, "the gradient buffer")
        if grads.dtype != layout.dtype:
            raise TypeError(f"gradient buffer has dtype {grads.dtype}; the parameters have dtype {layout.dtype}")
        if grads.shape != (layout.size,):
            raise ValueError(f"gradient buffer has shape {grads.shape}; the flat parameters' buffer has "
                             f"shape ({layout.size},) (padding included; see flat.zeros_like())")
        if not grads.flags.c_contiguous:
            raise ValueError("gradient buffer is not C-contiguous")
        g = grads
    else:
        raise TypeError(f"{where} takes the gradient as a FlatParams with the same layout "
                        f"(flat.zeros_like()) or its 1-D buffer, got {type(grads).__name__}")
    if np.may_share_memory(g, params):
        raise ValueError("the gradient shares memory with the parameters; pass a separate buffer "
                         "(flat.zeros_like())")
    return flat_view(g, layout.size)


class FlatParams(Mapping):
    """Named tensors of any shape held as views into one contiguous, aligned buffer.

    A read-only mapping from names to writable NumPy views. Writing through a view
    (``flat["w"][...] = x``) writes the buffer; an optimizer given a ``FlatParams`` (or
    selections of one, see :meth:`select`) updates every tensor with one kernel launch.

    Parameters
    ----------
    shapes : mapping or iterable of (name, shape) pairs
        Tensor names and shapes (an int or a tuple of ints), in buffer order. Names are
        non-empty strings; ``"layer1.weight"`` style names are fine.
    dtype : dtype-like, default float32
        float32 or float64.
    align : int, default 64
        Every tensor starts at a multiple of ``align`` bytes (a power of two). Padding
        between tensors is zero and belongs to no view.

    Attributes
    ----------
    buffer : numpy.ndarray
        The flat 1-D buffer, padding included, ``align``-byte aligned.
    layout : FlatLayout
        Names, shapes and offsets; shared with :meth:`zeros_like` copies.

    See Also
    --------
    FlatParams.from_arrays : build one from existing arrays (copied in).

    Examples
    --------
    >>> import numpy as np, fastopt as fo
    >>> flat = fo.FlatParams({"w": (2, 3), "b": 3})
    >>> flat["w"].shape, flat["b"].shape
    ((2, 3), (3,))
    >>> flat["b"][...] = 1.0
    >>> flat.layout.offsets, flat.buffer.size        # b starts 64 bytes (16 floats) in
    ((0, 16), 32)
    >>> grads = flat.zeros_like()
    >>> flat.select("w*").names
    ('w',)
    """

    __slots__ = ("_views", "buffer", "layout")

    def __init__(self, shapes: Mapping[str, ShapeLike] | Iterable[tuple[str, ShapeLike]], dtype=np.float32,
                 *, align: int = DEFAULT_ALIGN):
        layout = FlatLayout.build(shapes, dtype, align)
        self._attach(layout, aligned_zeros(layout.size, layout.dtype, layout.align))

    def _attach(self, layout: FlatLayout, buffer: np.ndarray) -> None:
        self.layout = layout
        self.buffer = buffer
        self._views = {
            name: buffer[start : start + size].reshape(shape)
            for name, shape, start, size in zip(layout.names, layout.shapes, layout.offsets, layout.sizes)
        }

    @classmethod
    def from_layout(cls, layout: FlatLayout, buffer: np.ndarray | None = None) -> FlatParams:
        """A ``FlatParams`` with ``layout`` over ``buffer`` (not copied), or over fresh zeros.

        Parameters
        ----------
        layout : FlatLayout
            The layout, e.g. ``other.layout``.
        buffer : numpy.ndarray or GPU array, optional
            A writable, C-contiguous 1-D ``np.ndarray`` or ``np.memmap`` of ``layout.size``
            elements of ``layout.dtype`` (other subclasses are a TypeError); the views share
            its memory, and ``.buffer`` is a plain ``np.ndarray`` view of it. Default: a new
            zeroed, aligned buffer. A GPU array (exposing ``__cuda_array_interface__``, or a Numba device
            array) gives a FlatParams on that GPU whose views are Numba device arrays.
        """
        if not isinstance(layout, FlatLayout):
            raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
        if buffer is None:
            buffer = aligned_zeros(layout.size, layout.dtype, layout.align)
        elif _is_device(buffer):  # a GPU buffer: device views (fastopt._flat_cuda)
            from . import _flat_cuda

            buffer = _flat_cuda.as_device_buffer(buffer, layout.size, layout.dtype)
        else:
            if not isinstance(buffer, np.ndarray):
                raise TypeError(f"buffer must be a NumPy array or a GPU array, got {type(buffer).__name__}")
            check_array_type(buffer, "buffer")
            if buffer.dtype != layout.dtype:
                raise TypeError(f"buffer has dtype {buffer.dtype}; the layout needs dtype {layout.dtype}")
            if buffer.shape != (layout.size,):
                raise ValueError(f"buffer has shape {buffer.shape}; the layout needs shape ({layout.size},)")
            if not buffer.flags.c_contiguous or not buffer.flags.writeable:
                raise ValueError("buffer must be C-contiguous and writable")
            buffer = flat_view(buffer, layout.size)  # an np.memmap: a plain view of its memory
        self = cls.__new__(cls)
        self._attach(layout, buffer)
        return self

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]], dtype=None,
                    *, align: int = DEFAULT_ALIGN) -> FlatParams:
        """Copy existing arrays into a new flat buffer.

        The arrays are copied, not referenced: after this, update the model through the
        returned views (``flat[name]``), not through the original arrays.

        Parameters
        ----------
        arrays : mapping or iterable of (name, array) pairs
            Names and array-likes, in buffer order.
        dtype : dtype-like, optional
            float32 or float64. Default: the arrays' common dtype, which must then be
            float32 or float64 for all of them.
        align : int, default 64
            As for :class:`FlatParams`.
        """
        items = list(arrays.items()) if isinstance(arrays, Mapping) else list(arrays)
        values = [(name, np.asarray(a)) for name, a in items]
        if dtype is None:
            dtypes = {a.dtype for _, a in values}
            if len(dtypes) > 1 or (dtypes and next(iter(dtypes)) not in FLOAT_DTYPES):
                raise TypeError(f"arrays have dtype(s) {', '.join(sorted(map(str, dtypes)))}; pass dtype= "
                                "(float32 or float64) to convert them")
            dtype = next(iter(dtypes)) if dtypes else np.float32
        flat = cls([(name, a.shape) for name, a in values], dtype, align=align)
        for name, a in values:
            flat._views[name][...] = a
        return flat

    # -- mapping ------------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in this FlatParams") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout.names)

    def __len__(self) -> int:
        return len(self.layout.names)

    def __contains__(self, name) -> bool:
        return name in self._views

    # Two FlatParams are equal only if they are the same object: compare ``a.buffer`` and
    # ``b.buffer`` (and ``a.layout == b.layout``) for values.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    # -- properties -----------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        """Tensor names, in buffer order."""
        return self.layout.names

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype

    @property
    def numel(self) -> int:
        """Number of parameter elements, padding excluded."""
        return self.layout.numel

    # -- new buffers ----------------------------------------------------------------------
    @property
    def on_device(self) -> bool:
        """Whether the buffer lives on a GPU (see :meth:`to_device`)."""
        return not isinstance(self.buffer, np.ndarray)

    def zeros_like(self) -> FlatParams:
        """A new zero-filled ``FlatParams`` with the same layout (for gradients), on the same
        device as this one."""
        if self.on_device:
            from . import _flat_cuda

            return FlatParams.from_layout(self.layout, _flat_cuda.zeros(self.layout.size, self.layout.dtype))
        return FlatParams.from_layout(self.layout)

    def copy(self) -> FlatParams:
        """A new ``FlatParams`` with the same layout and a copy of the values (same device)."""
        if self.on_device:
            from . import _flat_cuda

            return FlatParams.from_layout(self.layout, _flat_cuda.copy_buffer(self.buffer))
        new = FlatParams.from_layout(self.layout)
        np.copyto(new.buffer, self.buffer)
        return new

    def to_device(self) -> FlatParams:
        """A copy of this FlatParams on the GPU (Numba's current device), same layout.

        An optimizer over it updates the buffer with one CUDA launch per step
        (:mod:`fastopt._flat_cuda`). Needs CUDA (or the simulator)."""
        from .kernels import cuda as kcuda

        cuda = kcuda.require()
        host = self.to_host() if self.on_device else self
        return FlatParams.from_layout(self.layout, cuda.to_device(host.buffer))

    def to_host(self) -> FlatParams:
        """A copy of this FlatParams in host memory (a NumPy buffer), same layout."""
        new = FlatParams.from_layout(self.layout)
        if self.on_device:
            from . import _flat_cuda

            np.copyto(new.buffer, _flat_cuda.to_host(self.buffer))
        else:
            np.copyto(new.buffer, self.buffer)
        return new

    # -- selection ------------------------------------------------------------------------
    def select(self, *patterns: str, exclude: str | Iterable[str] = ()) -> FlatSelection:
        """The tensors whose names match any pattern, for one param group.

        Parameters
        ----------
        *patterns : str
            Exact names or shell-style globs (``"w*"``, ``"layer?.bias"``,
            ``"*.[wb]"``; see :mod:`fnmatch`, case-sensitive). A name that exists matches
            itself even if it contains glob characters.
        exclude : str or iterable of str, optional
            Patterns removed from the selection (``select("*", exclude="*.bias")``).

        Returns
        -------
        FlatSelection
            The matching tensors, in buffer order, each once.

        Raises
        ------
        ValueError
            If a pattern (in ``patterns`` or ``exclude``) matches no tensor: a typo would
            otherwise silently leave tensors out of a group.
        """
        if not patterns:
            raise TypeError("select() needs at least one pattern (use select('*') for every tensor)")
        if isinstance(exclude, str):
            exclude = (exclude,)
        chosen = self._match(patterns, "select()")
        dropped = self._match(tuple(exclude), "exclude") if exclude else set()
        names = tuple(n for n in self.layout.names if n in chosen and n not in dropped)
        return FlatSelection(self, names)

    def _match(self, patterns: Sequence[str], where: str) -> set[str]:
        matched: set[str] = set()
        for pattern in patterns:
            if not isinstance(pattern, str):
                raise TypeError(f"{where} patterns must be strings, got {pattern!r}")
            if pattern in self._views:
                matched.add(pattern)
                continue
            hits = [n for n in self.layout.names if fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                shown = ", ".join(self.layout.names[:8]) + (", ..." if len(self) > 8 else "")
                raise ValueError(f"{where} pattern {pattern!r} matches no tensor (names: {shown})")
            matched.update(hits)
        return matched

    def __repr__(self) -> str:
        return (f"FlatParams({len(self)} tensors, {self.numel:,} {self.dtype} parameters, "
                f"{self.buffer.nbytes:,} bytes, align={self.layout.align})")


class FlatSelection(Sequence):
    """Some tensors of one :class:`FlatParams`, chosen by :meth:`FlatParams.select`.

    Pass it as the ``params`` of a param group. It is a sequence of the selected views
    (in buffer order), so it also works where a list of arrays is expected.

    Attributes
    ----------
    flat : FlatParams
        The buffer the tensors live in.
    names : tuple of str
        The selected names, in buffer order.
    """

    __slots__ = ("flat", "names")

    def __init__(self, flat: FlatParams, names: Sequence[str]):
        if not isinstance(flat, FlatParams):
            raise TypeError(f"flat must be a FlatParams, got {type(flat).__name__}")
        for name in names:
            flat.layout.index(name)
        self.flat = flat
        self.names = tuple(names)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return FlatSelection(self.flat, self.names[i])
        return self.flat[self.names[i]]

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.flat[name] for name in self.names)

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:6]) + (", ..." if len(self.names) > 6 else "")
        return f"FlatSelection([{shown}], {len(self.names)} of {len(self.flat)} tensors)"


__all__ = ["DEFAULT_ALIGN", "FlatLayout", "FlatParams", "FlatSelection", "aligned_zeros"]
