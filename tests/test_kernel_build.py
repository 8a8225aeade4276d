"""The C kernel library's build and load: every ISA variant compiles with -Werror, the Python mirror of
fuselm_kernels.h matches the header and the compiled layout, and the loader refuses what it must (a
cached library recorded for another or unknown target, a library of another ABI version, a layout
that differs) instead of crashing with SIGILL or corrupting memory."""

from __future__ import annotations

import ctypes
import json
import logging
import platform
import re
import subprocess

import pytest

from fuselm.kernels import abi, build
from fuselm.kernels.cpu import CpuKernels, get_kernels, load_kernels

COMPILER = build.find_compiler()
pytestmark = pytest.mark.skipif(COMPILER is None, reason="no C compiler: the torch path is used and tested elsewhere")
X86 = platform.machine().lower() in ("x86_64", "amd64")
HEADER = (build.KERNEL_DIR / "fuselm_kernels.h").read_text()


def _accepts(flags) -> bool:
    probe = subprocess.run([COMPILER.path, *flags, "-E", "-x", "c", "-", "-o", "/dev/null"], input="",
                           capture_output=True, text=True)
    return probe.returncode == 0


@pytest.mark.parametrize("name", list(build.VARIANTS))
def test_every_variant_builds_with_warnings_as_errors(name, tmp_path):
    variant = build.VARIANTS[name]
    if variant.flags and not X86:
        pytest.skip("x86-64 variant")
    if not _accepts(variant.flags):
        pytest.skip(f"{COMPILER.identity} does not accept {' '.join(variant.flags)}")
    # variants this CPU runs go to the usual cache (the kernel tests load them from there)
    built = build.build(variant, COMPILER, None if build.supported(variant) else tmp_path)
    record = build.read_record(built.path)
    assert "-Werror" in record["flags"] and record["isa"] == name and record["key"] == built.key


@pytest.mark.skipif(not X86, reason="x86-64 variants")
@pytest.mark.parametrize("name, defined, undefined", [
    ("generic", [], ["__AVX2__", "__AVX512F__"]),
    ("avx2", ["__AVX2__", "__FMA__", "__F16C__"], ["__AVX512F__"]),
    ("avx512", ["__AVX2__", "__FMA__", "__F16C__", "__AVX512F__", "__AVX512BW__", "__AVX512VL__"], ["__AVX512BF16__"]),
    ("avx512bf16", ["__AVX2__", "__FMA__", "__F16C__", "__AVX512F__", "__AVX512BF16__"], []),
])
def test_variant_flags_define_what_the_sources_test(name, defined, undefined):
    """The macros the kernels' #if lines test (grep '__AVX\\|__F16C\\|__FMA' fuselm/kernels/*.[ch])."""
    flags = build.VARIANTS[name].flags
    if not _accepts(flags):
        pytest.skip(f"{COMPILER.identity} does not accept {' '.join(flags)}")
    out = subprocess.run([COMPILER.path, *flags, "-dM", "-E", "-x", "c", "-"], input="", capture_output=True, text=True,
                         check=True).stdout
    macros = set(re.findall(r"#define (\w+)", out))
    assert set(defined) <= macros and not set(undefined) & macros


def test_sources_share_the_header_and_declare_nothing_of_their_own():
    """Each source includes fuselm_kernels.h and declares no function it does not define (with
    -Wmissing-prototypes and -Wredundant-decls the build enforces this too)."""
    for name in build.SOURCES:
        text = (build.KERNEL_DIR / name).read_text()
        assert '#include "fuselm_kernels.h"' in text, name
        declared = re.findall(r"^(?:const\s+)?\w+[\s*]+(fuselm_\w+)\([^;{]*\);", text, re.MULTILINE)
        assert not declared, (name, declared)


def _c_kind(c_type: str):
    c_type = c_type.strip()
    if "*" in c_type:
        return "pointer"
    return {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "float": ctypes.c_float}[c_type.split()[-1]]


def _py_kind(ctype):
    return "pointer" if ctype in (ctypes.c_void_p, ctypes.c_char_p) or issubclass(ctype, ctypes._Pointer) else ctype


def test_ctypes_signatures_match_the_header():
    declarations = re.findall(r"^([\w ]+?\**)\s*\b(fuselm_\w+)\(([^)]*)\);", HEADER, re.MULTILINE)
    header = {}
    for ret, name, params in declarations:
        params = " ".join(params.split())
        args = [] if params == "void" else [_c_kind(re.sub(r"\w+$", "", p.strip())) for p in params.split(",")]
        header[name] = (args, None if ret.strip() == "void" else _c_kind(ret))
    assert header.keys() == abi.SIGNATURES.keys()
    for name, (argtypes, restype) in abi.SIGNATURES.items():
        mirrored = ([_py_kind(t) for t in argtypes], None if restype is None else _py_kind(restype))
        assert mirrored == header[name], name


def test_loaded_library_reports_this_abi_and_layout():
    kernels = get_kernels()
    assert kernels is not None
    assert kernels._lib.fuselm_abi_version() == abi.ABI_VERSION
    assert abi.library_table(kernels._lib) == abi.expected_table()


def test_load_logs_the_variant_and_why(caplog):
    with caplog.at_level(logging.INFO, logger="fuselm"):
        kernels = load_kernels()
    best = build.supported_variants()[-1]
    assert kernels.isa == best
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CPU kernels:")][-1]
    assert line.startswith(f"CPU kernels: {best} (") and ("cache hit" in line or "built in" in line)


def test_environment_forces_a_variant(monkeypatch):
    monkeypatch.setenv("FUSELM_CPU_ISA", "generic")
    assert load_kernels().isa == "generic"
    monkeypatch.setenv("FUSELM_CPU_ISA", "avx3000")
    with pytest.raises(ValueError, match="avx3000"):
        load_kernels()


def test_a_variant_the_cpu_lacks_is_an_error_and_never_chosen(monkeypatch):
    monkeypatch.setattr(build, "cpu_features", lambda: frozenset({"sse4_2"}))
    assert build.supported_variants() == ["generic"]
    assert build.candidates() == [(build.VARIANTS["generic"], "cpu lacks avx2")]
    with pytest.raises(RuntimeError, match="avx2"):
        load_kernels("avx2")
    monkeypatch.setenv("FUSELM_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="avx512f"):
        build.candidates()


def test_build_record_problems(monkeypatch):
    monkeypatch.setattr(build, "cpu_features", lambda: build.VARIANTS["avx512"].cpu_flags)
    avx2, bf16 = build.VARIANTS["avx2"], build.VARIANTS["avx512bf16"]
    good = {"key": "k1", "isa": "avx2", "cpu_flags": sorted(avx2.cpu_flags)}
    assert build.record_problem(good, "k1", avx2) is None
    assert "no readable" in build.record_problem(None, "k1", avx2)
    assert "unknown target" in build.record_problem({**good, "isa": "znver9"}, "k1", avx2)
    assert "not this build" in build.record_problem(good, "k2", avx2)
    # a record copied from a CPU with AVX-512 BF16, under the name this CPU would look up
    copied = {**good, "isa": "avx512bf16", "cpu_flags": sorted(bf16.cpu_flags)}
    assert "avx512_bf16" in build.record_problem(copied, "k1", bf16)


def test_cached_library_recorded_for_an_unknown_target_is_rebuilt(tmp_path):
    generic = build.VARIANTS["generic"]
    key = build.build_key(generic, COMPILER)
    path = build.library_path(generic, key, tmp_path)
    path.write_bytes(b"not a library: loading this would crash")
    build.record_path(path).write_text(json.dumps({"key": key, "isa": "znver9", "cpu_flags": []}))
    built = build.build(generic, COMPILER, tmp_path)
    assert not built.cache_hit and built.path == path
    assert build.read_record(path)["isa"] == "generic"
    assert CpuKernels(built).isa == "generic"  # the rebuilt library loads and reports its build
    assert build.build(generic, COMPILER, tmp_path).cache_hit


def _fake_cached_library(tmp_path, source: str):
    """A library compiled from `source` where the loader looks for the generic build, with a valid record."""
    generic = build.VARIANTS["generic"]
    key = build.build_key(generic, COMPILER)
    path = build.library_path(generic, key, tmp_path)
    src = tmp_path / "fake.c"
    src.write_text(source)
    subprocess.run([COMPILER.path, "-shared", "-fPIC", f"-I{build.KERNEL_DIR}", str(src), "-o", str(path)], check=True)
    build.record_path(path).write_text(json.dumps({"key": key, "isa": "generic", "cpu_flags": []}))


@pytest.mark.parametrize("source", [
    '#include "fuselm_kernels.h"\nint fuselm_abi_version(void) { return FUSELM_ABI_VERSION + 1; }\n',
    "int fuselm_something_else(void);\nint fuselm_something_else(void) { return 0; }\n",  # no version at all
], ids=["next-version", "unversioned"])
def test_library_of_another_abi_version_is_refused(tmp_path, caplog, source):
    _fake_cached_library(tmp_path, source)
    with caplog.at_level(logging.WARNING, logger="fuselm"):
        assert load_kernels("generic", tmp_path) is None
    assert any("ABI" in r.getMessage() for r in caplog.records)


def test_python_structure_that_differs_from_the_c_layout_is_an_error(monkeypatch):
    class WrongPart(ctypes.Structure):  # bits as int64: every later field would be read from the wrong place
        _fields_ = [(name, ctypes.c_int64 if name == "bits" else ctype) for name, ctype in abi.QPart._fields_]

    monkeypatch.setattr(abi, "QPart", WrongPart)
    with pytest.raises(abi.AbiLayoutMismatch, match=r"offsetof\(QPart, scale_dtype\)"):
        load_kernels("generic")


def test_sources_that_warn_under_another_compiler_still_build_without_werror(tmp_path, monkeypatch, caplog):
    """-Werror guards fuselm's own builds; a user's newer compiler that finds something to warn about
    still gets the kernels (built without -Werror, the warning logged), not the slow torch path."""
    sources = tmp_path / "src"
    sources.mkdir()
    for name in (*build.SOURCES, *build.HEADERS):
        (sources / name).write_text((build.KERNEL_DIR / name).read_text())
    with open(sources / "abi.c", "a") as f:
        f.write("static int never_called(void) { return 0; }\n")  # -Wunused-function
    monkeypatch.setattr(build, "KERNEL_DIR", sources)
    with caplog.at_level(logging.WARNING, logger="fuselm"):
        built = build.build(build.VARIANTS["generic"], COMPILER, tmp_path)
    assert "-Werror" not in build.read_record(built.path)["flags"]
    assert any("never_called" in r.getMessage() for r in caplog.records)
