"""Two hints to LLVM that Numba has no words for, as Numba intrinsics.

- :func:`prefer_wide_vectors` marks the function it is called in with LLVM's
  ``"prefer-vector-width"="512"`` attribute. On an AVX-512 CPU LLVM vectorizes for 256-bit
  registers unless told otherwise (Intel's older cores lowered their clock under 512-bit
  code); the noise kernels, whose hash-and-Box-Muller arithmetic is compute bound, run
  ~25% faster with 512-bit vectors on the 2-core Xeon this project is measured on (the
  memory-bound update loops gain nothing, so they keep LLVM's default). The attribute is
  per function, so nothing else in the process changes (``NUMBA_CPU_FEATURES`` would change
  every Numba function). Called in a ``prange`` body, it marks the outlined parallel body,
  which is where the loop is. Without AVX-512 the attribute changes nothing.
- :func:`prefetch` asks for the cache line holding ``array[index]`` (``llvm.prefetch``:
  a read, keep in all cache levels). It never faults, so ``index`` may run past the end of the
  array. A kernel whose arithmetic is heavy enough to slow its own loads (the noise kernels)
  issues one per cache line a few KiB ahead, so the lines are in flight while it computes.

Both are Numba ``@intrinsic`` functions: they exist only inside jitted code.
"""

from __future__ import annotations

from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

#: The LLVM attribute that lets the loop vectorizer use 512-bit registers.
WIDE_VECTORS = '"prefer-vector-width"="512"'


@intrinsic
def prefer_wide_vectors(typingctx):
    """Let LLVM vectorize the enclosing function with 512-bit registers (see the module doc)."""

    def codegen(context, builder, signature, args):
        # llvmlite's FunctionAttributes accepts only a fixed list of names; a string attribute
        # is valid LLVM IR after the parameter list, so add it to the underlying set
        set.add(builder.function.attributes, WIDE_VECTORS)
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def prefetch(typingctx, array, index):
    """Prefetch the cache line of ``array[index]`` (a 1-d array, an integer index; no bounds
    check, no fault)."""
    if not (isinstance(array, types.Array) and array.ndim == 1 and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        ary = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, ary, [args[1]], wraparound=False,
                                           boundscheck=False)
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0i8")
        # (address, 0 = read, 3 = keep in every cache level, 1 = data cache)
        builder.call(function, [builder.bitcast(pointer, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return types.void(array, index), codegen
