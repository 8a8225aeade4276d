"""Compile fuselm's C kernels for one instruction-set variant, cached by the target they were built for.

The kernels choose their AVX2 / AVX-512 / AVX-512-BF16 code paths with the preprocessor, so a
binary runs only on CPUs with the instructions it was compiled for. Built with -march=native and
cached under a hash of the sources, a cache shared between machines (a network home directory, a
copied ~/.cache, a container image) could hand one CPU's binary to an older one, which then dies of
SIGILL. Instead:

- the library is built per ISA variant (VARIANTS) with explicit target flags, never -march=native;
- the cache key hashes the sources, the compiler's identity (`--version`, `-dumpmachine`), the
  flags and the variant, and the file name carries the variant and key;
- a JSON record next to each library says what it was built for (key, variant, the CPU features
  its code may use); a cached library is used only when its record has the expected key and
  names a known variant whose features this CPU has. Anything else is rebuilt in its place.

fuselm/kernels/cpu.py picks the variant (`candidates`) and loads the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fuselm.kernels.abi import ABI_VERSION

logger = logging.getLogger("fuselm")

KERNEL_DIR = Path(__file__).parent
SOURCES = ("abi.c", "paged_attention.c", "paged_attention_int8.c", "layer_ops.c", "quant_linear.c", "dense_linear.c",
           "decode_layers.c", "moe.c", "moe_float.c", "cascade_attention.c", "chunk_attention.c", "quant_rows.c",
           "quant_project.c", "moe_few_rows.c", "int4_rows16.c", "int8_rows16.c", "rows16.c")
HEADERS = ("fuselm_kernels.h", "bf16_simd.h", "cascade_blocks.h", "cascade_panel.h", "softmax_exp.h",
           "attention_f32_avx2.h", "attention_f32_avx512.h", "attention_bf16_avx512.h", "rows16_simd.h", "prefetch_spread.h")
_BASE_FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC", "-std=c11")
# -Wmissing-prototypes: every exported function is declared in fuselm_kernels.h;
# -Wredundant-decls: no source declares another's functions again.
WARNING_FLAGS = ("-Wall", "-Wextra", "-Wmissing-prototypes", "-Wredundant-decls", "-Wstrict-prototypes", "-Werror")


@dataclass(frozen=True)
class IsaVariant:
    name: str
    flags: tuple[str, ...]  # the compiler's target flags
    cpu_flags: frozenset[str]  # features (as /proc/cpuinfo names them) that the compiled code may use
    marker: str  # the feature that selects it, for the log line


# The x86-64 micro-architecture levels of the psABI, in /proc/cpuinfo's names (pni = SSE3, abm = LZCNT).
_X86_64_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"})
_X86_64_V3 = _X86_64_V2 | {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}

# From the most portable to the fastest. x86-64-v3 defines __AVX2__, __FMA__ and __F16C__ (every
# AVX2 path); the BF16 paths also need __AVX512BF16__. Every CPU with AVX512_BF16 (Cooper Lake, Sapphire
# Rapids, Zen 4) has AVX512_VNNI too, which quant_rows.c's int4 path uses.
VARIANTS = {v.name: v for v in (
    IsaVariant("generic", (), frozenset(), ""),  # chosen when the CPU lacks x86-64-v3
    IsaVariant("avx2", ("-march=x86-64-v3",), _X86_64_V3, "avx2"),
    IsaVariant("avx512", ("-march=x86-64-v4",), _X86_64_V4, "avx512f"),
    IsaVariant("avx512bf16", ("-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni"),
               _X86_64_V4 | {"avx512_bf16", "avx512_vnni"}, "avx512_bf16"),
)}


@lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """This CPU's features: /proc/cpuinfo's flags on Linux, else what torch's dispatcher found
    (its AVX2 / AVX512 levels, taken as x86-64-v3 / v4; BF16 is then not assumed)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch

    return {"AVX512": _X86_64_V4, "AVX2": _X86_64_V3}.get(torch.backends.cpu.get_cpu_capability(), frozenset())


def supported(variant: IsaVariant) -> bool:
    return variant.cpu_flags <= cpu_features()


def supported_variants() -> list[str]:
    """The variants this CPU runs, from the most portable to the fastest."""
    return [name for name, v in VARIANTS.items() if supported(v)]


def candidates() -> list[tuple[IsaVariant, str]]:
    """The variants to try, best first, each with why it was chosen: the one FUSELM_CPU_ISA names
    (an error if this CPU lacks it), else every variant this CPU supports."""
    forced = os.environ.get("FUSELM_CPU_ISA")
    if forced:
        return [(require(forced), f"FUSELM_CPU_ISA={forced}")]
    best_first = [VARIANTS[name] for name in reversed(supported_variants())]
    return [(v, f"cpu has {v.marker}" if v.cpu_flags else _why_generic()) for v in best_first]


def _why_generic() -> str:
    missing = VARIANTS["avx2"].cpu_flags - cpu_features()
    return "cpu lacks avx2" if "avx2" in missing else f"cpu lacks {', '.join(sorted(missing))}"


def require(name: str) -> IsaVariant:
    """The variant `name`, which this CPU must support."""
    if name not in VARIANTS:
        raise ValueError(f"unknown CPU kernel ISA {name!r}: choose one of {', '.join(VARIANTS)}")
    missing = VARIANTS[name].cpu_flags - cpu_features()
    if missing:
        raise RuntimeError(f"CPU kernel ISA {name!r} needs {', '.join(sorted(missing))}, which this CPU lacks")
    return VARIANTS[name]


@dataclass(frozen=True)
class Compiler:
    path: str
    identity: str  # `--version`'s first line and the target triple


def find_compiler() -> Compiler | None:
    path = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    return None if path is None else Compiler(path, _identity(path))


@lru_cache(maxsize=None)
def _identity(path: str) -> str:
    parts = []
    for flag in ("--version", "-dumpmachine"):
        try:
            out = subprocess.run([path, flag], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        parts.append(out.strip().splitlines()[0] if out.strip() else "unknown")
    return " / ".join(parts)


def flags_for(variant: IsaVariant) -> list[str]:
    return [*_BASE_FLAGS, *WARNING_FLAGS, *variant.flags]


def build_key(variant: IsaVariant, compiler: Compiler) -> str:
    """What a library's contents depend on, hashed: sources, compiler, flags, variant, ABI version."""
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (KERNEL_DIR / name).read_bytes() + b"\0")
    target = {"abi_version": ABI_VERSION, "isa": variant.name, "cpu_flags": sorted(variant.cpu_flags),
              "compiler": compiler.identity, "flags": flags_for(variant)}
    digest.update(json.dumps(target, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    root = os.environ.get("FUSELM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fuselm")
    return Path(root) / "kernels"


def library_path(variant: IsaVariant, key: str, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / f"fuselm_cpu_{variant.name}_{key}.so"


def record_path(library: Path) -> Path:
    return library.with_suffix(".json")


def record_problem(record: dict | None, key: str, variant: IsaVariant) -> str | None:
    """Why a cached library with this build record must not be loaded for (key, variant), or None."""
    if not isinstance(record, dict):
        return "no readable build record"
    isa = record.get("isa")
    if isa not in VARIANTS:
        return f"built for an unknown target {isa!r}"
    if record.get("key") != key or isa != variant.name:
        return f"its record ({isa}, key {record.get('key')}) is not this build ({variant.name}, key {key})"
    missing = set(record.get("cpu_flags", ["?"])) - cpu_features()
    if missing:
        return f"built for {isa}, which needs {', '.join(sorted(missing))}: this CPU lacks it"
    return None


def read_record(library: Path) -> dict | None:
    try:
        return json.loads(record_path(library).read_text())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Built:
    path: Path
    key: str
    variant: IsaVariant
    cache_hit: bool
    seconds: float = 0.0  # compile time when built now


class BuildError(RuntimeError):
    pass


def cpu_model_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name as /proc/cpuinfo gives it (platform's processor string elsewhere), with its
    family, model and stepping where it gives them: cloud guests often see only "AMD EPYC", the same
    string on a Zen 4 and a Zen 5 host, whose measured kernel choices and figures differ."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name:
        return platform.processor() or platform.machine() or "unknown"
    ident = [f"{label} {fields[key]}" for key, label in (("cpu family", "family"), ("model", "model"),
                                                          ("stepping", "stepping")) if fields.get(key)]
    return f"{name} ({' '.join(ident)})" if ident else name


def build(variant: IsaVariant, compiler: Compiler, directory: Path | None = None) -> Built:
    """The library for `variant`: from the cache when its record allows it, else compiled now."""
    key = build_key(variant, compiler)
    target = library_path(variant, key, directory)
    if target.exists():
        problem = record_problem(read_record(target), key, variant)
        if problem is None:
            return Built(target, key, variant, cache_hit=True)
        logger.warning("not loading the cached CPU kernels %s: %s; rebuilding", target, problem)
    target.parent.mkdir(parents=True, exist_ok=True)
    # On stderr, not in the log: a first start pauses here for seconds, and should say why.
    print(f"compiling CPU kernels for {cpu_model_name()} ({variant.name}; first run only)...", file=sys.stderr,
          flush=True)
    start = time.perf_counter()
    flags = flags_for(variant)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        try:
            _compile(compiler, flags, variant, key, tmp)
        except subprocess.CalledProcessError as exc:
            if "-Werror" not in (exc.stderr or ""):
                raise
            # a compiler fuselm was not tested with warns: the kernels are still worth having
            logger.warning("the CPU kernel sources warn under %s; built without -Werror:\n%s", compiler.identity,
                           exc.stderr.strip()[:2000])
            flags = [f for f in flags if f != "-Werror"]
            _compile(compiler, flags, variant, key, tmp)
        os.replace(tmp, target)  # atomic: concurrent builders never see a half-written file
    except (OSError, subprocess.CalledProcessError) as exc:
        Path(tmp).unlink(missing_ok=True)
        detail = getattr(exc, "stderr", "") or str(exc)
        raise BuildError(f"{variant.name}: {detail.strip()[:500]}") from None
    record = {"key": key, "isa": variant.name, "cpu_flags": sorted(variant.cpu_flags), "abi_version": ABI_VERSION,
              "compiler": compiler.identity, "flags": flags}
    _write_atomically(record_path(target), json.dumps(record, indent=1))
    return Built(target, key, variant, cache_hit=False, seconds=time.perf_counter() - start)


def _compile(compiler: Compiler, flags: list[str], variant: IsaVariant, key: str, output: str) -> None:
    defines = [f'-DFUSELM_BUILD_KEY="{key}"', f'-DFUSELM_ISA="{variant.name}"']
    sources = [str(KERNEL_DIR / name) for name in SOURCES]
    subprocess.run([compiler.path, *flags, *defines, *sources, "-o", output, "-lm"], check=True, capture_output=True,
                   text=True)


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
