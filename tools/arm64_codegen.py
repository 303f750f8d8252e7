"""What LLVM makes of edgelm's kernel IR for arm64, on any machine: cross-compile the per-type code.

    python3 tools/arm64_codegen.py            # a table: type -> NEON instructions of interest
    python3 tools/arm64_codegen.py IQ4_NL -S  # and that type's assembly

The matvec/matmul kernels are Numba functions whose per-type work is LLVM IR written by edgelm's emitters
(quant/formats.py, quant/kernels.py).  Numba only compiles for the machine it runs on, so this script builds
the same emitters' IR into plain llvmlite functions -- per type: the integer dot of decode (`_dot_rows_int`),
the float dot (`_dot_rows`), and a block decode (prefill/get_rows) -- with the target switches set as they are
on arm64 (`formats._ARM64`: NEON tbl for the 16-entry tables, hardware f16 conversion, no x86 intrinsics),
optimises the module at O3 and emits AArch64 assembly with llvmlite's own LLVM (its wheels carry the AArch64
backend).  tests/test_arm64_codegen.py checks from it that every type compiles for arm64 without an x86
intrinsic or a library call, and that the instructions arm64 has for this work are the ones used: smull +
addp for the int16 pair products (x86: vpmaddwd), tbl for the table lookups (x86: pshufb), fcvtl for f16
(x86: vcvtph2ps).  Running the code is tools/arm64_check.sh's job (qemu).

NEON's sdot (int8 x int8 -> int32) has no use here: the decode dot keeps activations in int16 (see
quant/kernels.py's docstring), which smull/smlal already take at full width.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRIPLE = "aarch64-unknown-linux-gnu"
CPU = "apple-m1"                   # ARMv8.5-A + dotprod/fp16 (what llvm calls Apple's first arm64 laptops)
# Instructions worth counting (AArch64 mnemonics)
OF_INTEREST = ("smull", "smull2", "smlal", "smlal2", "addp", "tbl", "fcvtl", "fcvtl2", "fmla", "sdot")


@contextlib.contextmanager
def arm64_switches():
    """The target switches of quant/formats.py as numba on arm64 sets them at import."""
    from edgelm.quant import formats
    saved = {k: getattr(formats, k) for k in ("_ARM64", "_NATIVE_F16", "_AVX2", "_SSSE3", "_BYTE_LOOKUP")}
    try:
        formats._ARM64, formats._NATIVE_F16, formats._AVX2, formats._SSSE3 = True, True, False, False
        formats._BYTE_LOOKUP = "llvm.aarch64.neon.tbl1.v16i8"
        yield
    finally:
        for k, v in saved.items():
            setattr(formats, k, v)


def build_module(type_names=None):
    """An llvmlite module with, per quant type, @int_dot_T, @float_dot_T and @decode_T (the kernels' per-type
    code over one row), built with the arm64 switches."""
    from llvmlite import ir

    from edgelm.quant import kernels as K
    from edgelm.quant.formats import FORMATS

    mod = ir.Module(name="edgelm_arm64")
    mod.triple = TRIPLE
    f32, i16, i64, i8p = ir.FloatType(), ir.IntType(16), ir.IntType(64), ir.IntType(8).as_pointer()
    f32p, i16p = f32.as_pointer(), i16.as_pointer()
    names = []
    with arm64_switches():
        for t, fmt in sorted(FORMATS.items()):
            name = fmt.name
            if type_names and name not in type_names:
                continue
            names.append(name)
            if fmt.block_size > 1:          # the integer dot: quantized types only (as in _mv_rows)
                fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i8p, i64, i16p, f32p, f32p, f32p, f32p]),
                                 name=f"int_dot_{name}")
                b = ir.IRBuilder(fn.append_basic_block())
                row, n, xq, xsc, xs, xbs, out = fn.args
                (dot,) = K._dot_rows_int(b, fmt, row, n, [(xq, xsc, xs, xbs)], 1, K._PF_BYTES)
                b.store(dot, out)
                b.ret_void()
            fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i8p, i64, f32p, f32p, f32p]),
                             name=f"float_dot_{name}")
            b = ir.IRBuilder(fn.append_basic_block())
            row, n, x, xs, out = fn.args
            (dot,) = K._dot_rows(b, fmt, [row], n, x, xs, K._PF_BYTES)
            b.store(dot, out)
            b.ret_void()
            fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [i8p, f32p]), name=f"decode_{name}")
            b = ir.IRBuilder(fn.append_basic_block())
            src, dst = fn.args
            for j, pc in enumerate(fmt.emit(b, src, fmt.step)):
                q = b.gep(dst, [ir.Constant(i64, K.LANES * j)])
                b.store(K.decode_piece(b, pc), b.bitcast(q, K._V32F.as_pointer()), align=4)
            b.ret_void()
    return mod, names


def compile_arm64(mod) -> str:
    """O3 + AArch64 assembly of `mod` (llvmlite's LLVM)."""
    import llvmlite.binding as llvm
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    tm = llvm.Target.from_triple(TRIPLE).create_target_machine(cpu=CPU, opt=3, reloc="pic", codemodel="default")
    m = llvm.parse_assembly(str(mod))
    m.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(m, pb)
    return tm.emit_assembly(m)


def per_function(asm: str) -> dict[str, list[str]]:
    """{function name: its instruction lines}."""
    out, cur = {}, None
    for line in asm.splitlines():
        m = re.match(r"^([A-Za-z_][\w.]*):", line)
        if m and not m.group(1).startswith(".L"):
            cur = m.group(1)
            out[cur] = []
        elif cur and line.startswith("\t") and not line.startswith("\t."):
            out[cur].append(line.strip())
    return out


def mnemonics(lines: list[str]) -> Counter:
    return Counter(line.split()[0] for line in lines if line and not line.startswith("//"))


def calls(lines: list[str]) -> list[str]:
    """Calls out of the function (a libcall where LLVM had no instruction: __extendhfsf2, memcpy, ...)."""
    return [line for line in lines if line.split()[0] in ("bl", "blr", "b") and not re.search(r"\.L", line)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("types", nargs="*", help="quant type names (default: all)")
    ap.add_argument("-S", action="store_true", help="print the assembly of the selected types")
    a = ap.parse_args(argv)
    mod, names = build_module(set(a.types) or None)
    asm = compile_arm64(mod)
    funcs = per_function(asm)
    print(f"{'function':<22} {'instrs':>6}  calls  " + " ".join(f"{k:>6}" for k in OF_INTEREST))
    for fname, lines in funcs.items():
        c = mnemonics(lines)
        print(f"{fname:<22} {sum(c.values()):>6}  {len(calls(lines)):>5}  "
              + " ".join(f"{c.get(k, 0):>6}" for k in OF_INTEREST))
    if a.S:
        print(asm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
