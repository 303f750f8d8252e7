"""Every quant type's kernel code compiles for arm64 with arm64's instructions, checked on any machine by
cross-compiling the emitters' IR with llvmlite's AArch64 backend (tools/arm64_codegen.py).  Running that code
is checked under qemu by tools/arm64_check.sh; this catches, in every CI run, an x86-only intrinsic or a
library call slipping into the per-type code."""
from __future__ import annotations

import pytest

from edgelm.quant import formats
from edgelm.quant.formats import FORMATS

from .conftest import load_tool


A = load_tool("arm64_codegen")


@pytest.fixture(scope="module")
def compiled():
    import llvmlite.binding as llvm
    llvm.initialize_all_targets()
    try:
        llvm.Target.from_triple(A.TRIPLE)
    except RuntimeError:
        pytest.skip("this llvmlite has no AArch64 backend")
    mod, names = A.build_module()
    ir_text = str(mod)
    return ir_text, A.per_function(A.compile_arm64(mod)), names


def test_switches_are_restored(compiled):
    assert formats._ARM64 == formats._target_is_arm64()
    assert (formats._BYTE_LOOKUP is None) == (not formats._ARM64 and not formats._SSSE3)


def test_no_x86_intrinsics_and_no_library_calls(compiled):
    ir_text, funcs, names = compiled
    assert "llvm.x86" not in ir_text and "asm " not in ir_text
    assert sorted(names) == sorted(f.name for f in FORMATS.values())
    kernels = {n: lines for n, lines in funcs.items() if not n.startswith("edgelm_")}
    assert len(kernels) == 3 * len(names) - sum(f.block_size == 1 for f in FORMATS.values())
    for name, lines in kernels.items():
        assert lines, name
        assert not A.calls(lines), f"{name} calls out: {A.calls(lines)[:3]}"


@pytest.mark.parametrize("name", [f.name for f in FORMATS.values() if f.block_size > 1])
def test_integer_dot_uses_widening_multiplies(compiled, name):
    """The int16 pair products (x86 vpmaddwd) become smull/smull2 + addp, not scalar code."""
    _, funcs, _ = compiled
    m = A.mnemonics(funcs[f"int_dot_{name}"])
    assert m["smull"] >= 16 and m["smull2"] >= 16 and m["addp"] >= 8, dict(m)


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS", "MXFP4"])
def test_sixteen_entry_tables_use_tbl(compiled, name):
    """The 4-bit codebooks are looked up 16 at a time by NEON tbl (x86: pshufb)."""
    ir_text, funcs, _ = compiled
    assert "llvm.aarch64.neon.tbl1" in ir_text
    assert A.mnemonics(funcs[f"decode_{name}"])["tbl"] >= 2


@pytest.mark.parametrize("name", ["F16", "Q8_0", "Q4_K", "Q6_K"])
def test_f16_converts_in_hardware(compiled, name):
    _, funcs, _ = compiled
    lines = funcs[f"decode_{name}"] + funcs.get(f"int_dot_{name}", [])
    m = A.mnemonics(lines)
    assert m["fcvtl"] + m["fcvtl2"] + m["fcvt"] >= 1, dict(m)
