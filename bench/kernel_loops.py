"""What each matmul kernel's main loop costs, read from its machine code on a machine without a GPU; prints JSON.

Batch-1 decode matmuls are bound by the instructions a byte of weights takes more than by memory (on an H200 the
8-bit kernel reads at 91% of the copy bandwidth, the 4-bit one at 70%: bench/NOTES-engine.md), so a kernel change
can be judged first by its loop: instructions, mmas and global loads a chunk, registers, spills. This compiles the
engine's kernel sources with NVRTC for one architecture and disassembles them with cuobjdump, both from NVIDIA's
PyPI wheels (no GPU, no CUDA toolkit):

  pip download --no-deps -d /tmp/cuda nvidia-cuda-nvrtc nvidia-cuda-cuobjdump
  for w in /tmp/cuda/*.whl; do unzip -qo "$w" -d /tmp/cuda/x; done
  python bench/kernel_loops.py --cuda /tmp/cuda/x [--arch sm_90] [--sass DIR] [NAME ...]

NAME: instantiations such as 'int4_mma<24,2,1,4,0,0,false,false>' or 'lowbit_mma<3,8,4,1,8,0,0,false>' (template
arguments as engine.int4_mma.kernel_name and engine.lowbit_mma.kernel_name spell them); by default the ones the 7B
rows of bench/engine.py --gpu launch. --sass DIR also writes each one's disassembly there.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if not __package__:   # run as a script: its folder first on the path, where bench/engine.py shadows the engine package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from engine import int4_mma, lowbit_mma  # noqa: E402


def default_names() -> list[str]:
    """The instantiations the 7B rows of bench/engine.py --gpu launch, each form packed small on the CPU and named
    by its module's kernel_name at config_for's shape below N = 8192 (wo) and from it (wqkv): GPTQ 4-bit g128,
    AWQ g128, act-order g32 (its orders made by the layers before: the plain kernel), GGUF Q4_K, GPTQ 3-bit and
    8-bit g128."""
    from bench.engine import random_gguf_weight   # late: it loads the whole bench (transformers among it)

    k, n, cpu = 512, 16, torch.device("cpu")
    levels = lambda high: torch.randint(0, high, (k, n), dtype=torch.uint8)
    scales = lambda gs: (torch.rand(k // gs, n) * 0.01 + 0.001).half()
    q4k = random_gguf_weight("Q4_K", k, n, cpu, [])
    four_bit = [int4_mma.pack(levels(16), scales(128), None, 128),
                int4_mma.pack(levels(16), scales(128), levels(16)[: k // 128], 128),
                int4_mma.pack(levels(16), scales(32), None, 32),
                int4_mma.pack(q4k.q, q4k.scales, q4k.zeros, q4k.group_size, offsets=q4k.offsets)]
    low_bit = [lowbit_mma.pack(levels(2**bits), scales(128), None, 128, bits) for bits in (3, 8)]
    shapes = (4096, 12288)
    return ([int4_mma.kernel_name(w, int4_mma.config_for(outputs, factored=w.store.factored))
             for w in four_bit for outputs in shapes]
            + [lowbit_mma.kernel_name(w, lowbit_mma.config_for(outputs, w.width, w.store.factored))
               for w in low_bit for outputs in shapes])


INSTRUCTION = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def compile_cubin(nvrtc, source: str, name: str, arch: str) -> tuple[bytes, str]:
    """(cubin, ptxas' report) of one instantiation."""
    prog = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernels.cu", 0, None, None):
        raise RuntimeError("nvrtcCreateProgram failed")
    try:
        nvrtc.nvrtcAddNameExpression(prog, name.encode())
        opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
        status = nvrtc.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        if status:
            raise RuntimeError(f"{name}: NVRTC failed\n{log.value.decode()}")
        nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw, log.value.decode()
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))


def main_loop(sass: str) -> list[str]:
    """The instructions of the longest backward-branching loop with an mma in it (the kernel's chunk loop)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(INSTRUCTION.match, sass.splitlines()) if m]
    best: list[str] = []
    for at, text in code:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < at:
            body = [t for a, t in code if int(target.group(1), 16) <= a <= at]
            if any("HMMA" in t for t in body) and len(body) > len(best):
                best = body
    return best


def opcode(instruction: str) -> str:
    """'@!P0 BRA 0x20' -> 'BRA', 'HMMA.16816.F32.BF16 R12, ...' -> 'HMMA'."""
    words = instruction.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def chunk_bytes(name: str) -> int:
    """Bytes of weights one warp's chunk covers (a tile's 16 rows), by kernel and width."""
    if name.startswith("int4_mma"):
        return 32 * 16
    return lowbit_mma.CHUNK_BYTES[lowbit_mma.WIDTH[int(name.split("<")[1].split(",")[0])]]


def report(name: str, cubin: bytes, log: str, cuobjdump: Path, sass_dir: Path | None) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(cuobjdump), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    if sass_dir:
        sass_dir.mkdir(parents=True, exist_ok=True)
        (sass_dir / (re.sub(r"[<>, ]+", "_", name).strip("_") + ".sass")).write_text(sass)
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    loop = main_loop(sass)
    count = lambda op: sum(opcode(t) == op for t in loop)
    return {"registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else None,
            "loop_instructions": len(loop), "mmas": count("HMMA"), "global_loads": count("LDG"),
            "chunk_bytes": chunk_bytes(name), "instructions_a_byte": round(len(loop) / chunk_bytes(name), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="*", help="instantiations (default: default_names())")
    ap.add_argument("--cuda", type=Path, required=True, help="where the nvrtc and cuobjdump wheels are unpacked")
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--sass", type=Path, help="also write each disassembly into this folder")
    args = ap.parse_args()
    nvrtc_lib = next(iter(sorted(args.cuda.glob("nvidia/*/lib/libnvrtc.so*"))), None)
    cuobjdump = next(iter(sorted(args.cuda.glob("nvidia/*/bin/cuobjdump"))), None)
    if nvrtc_lib is None or cuobjdump is None:
        sys.exit(f"{args.cuda}: no nvidia/*/lib/libnvrtc.so* or nvidia/*/bin/cuobjdump (see --help)")
    nvrtc = ctypes.CDLL(str(nvrtc_lib))
    sources = {"int4_mma": int4_mma.SOURCE, "int4_dequant": int4_mma.SOURCE,
               "lowbit_mma": lowbit_mma.SOURCE, "lowbit_dequant": lowbit_mma.SOURCE}
    out = {"arch": args.arch, "nvrtc": nvrtc_lib.name}
    for name in args.names or default_names():
        cubin, log = compile_cubin(nvrtc, sources[name.split("<")[0]], name, args.arch)
        out[name] = report(name, cubin, log, cuobjdump, args.sass)
        print(name, out[name], file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
