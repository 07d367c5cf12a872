#!/usr/bin/env python3
"""SASS of the Vulkan pipelines that NVIDIA's driver cached: nv_sass.py CACHE_DIR OUT_PREFIX

Run a program (e.g. `examples/pipeline_stats`) with
  __GL_SHADER_DISK_CACHE=1 __GL_SHADER_DISK_CACHE_SKIP_CLEANUP=1 __GL_SHADER_DISK_CACHE_PATH=CACHE_DIR
and each compiled pipeline lands in CACHE_DIR as a `.bin` entry: zstd frames, one of which holds an
"NVDANVVM" image whose header gives the machine code's size (u32 at 0x4c) and offset (u32 at 0x50,
plus 8). This writes that code to OUT_PREFIX<n>.code and its disassembly (`nvdisasm -b SM90`, the
H200's architecture; set NV_ARCH for another) to OUT_PREFIX<n>.sass, and to OUT_PREFIX<n>.ctl each
instruction with the scheduling bits that nvdisasm leaves out: its stall cycles, the scoreboard its
result sets (`wr`) and the one that frees its sources (`rd`), and the scoreboards it waits for (`wait`),
from bits 105-121 of the 128-bit instruction as published for Volta and later (Jia et al., "Dissecting the
NVIDIA Volta GPU Architecture via Microbenchmarking"). Needs `zstd` (or $ZSTD) and `nvdisasm` (or
$NVDISASM, default /usr/local/cuda/bin/nvdisasm).
"""
import os
import re
import struct
import subprocess
import sys

MAGIC = b"\x28\xb5\x2f\xfd"


def images(data):
    """The NVDANVVM images in the zstd frames of one cache entry."""
    at = data.find(MAGIC)
    while at >= 0:
        out = subprocess.run([os.environ.get("ZSTD", "zstd"), "-d", "-c", "-q"], input=data[at:],
                             capture_output=True).stdout
        if out.startswith(b"NVDANVVM") and len(out) >= 0x58:
            yield out
        at = data.find(MAGIC, at + 4)


def control(code, sass):
    """One line per instruction: offset, scheduling bits, text."""
    text = {}
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            text[int(m.group(1), 16)] = m.group(2)
    lines = []
    for at in range(0, len(code) - 15, 16):
        hi = struct.unpack_from("<Q", code, at + 8)[0]
        stall, wr, rd, wait = (hi >> 41) & 0xF, (hi >> 46) & 7, (hi >> 49) & 7, (hi >> 52) & 0x3F
        sb = lambda b: "-" if b == 7 else str(b)
        waits = ",".join(str(b) for b in range(6) if wait >> b & 1) or "-"
        lines.append(f"{at:05x}  stall {stall:2}  wr {sb(wr)}  rd {sb(rd)}  wait {waits:11}  {text.get(at, '?')}")
    return "\n".join(lines) + "\n"


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    root, prefix = sys.argv[1], sys.argv[2]
    nvdisasm = os.environ.get("NVDISASM", "/usr/local/cuda/bin/nvdisasm")
    arch = os.environ.get("NV_ARCH", "SM90")
    n = 0
    for d, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if not f.endswith(".bin"):
                continue
            with open(os.path.join(d, f), "rb") as entry:
                data = entry.read()
            for img in images(data):
                size, off = struct.unpack_from("<II", img, 0x4c)
                if off + 8 + size > len(img):
                    print(f"{f}: an image of {len(img)} bytes names code at {off + 8}..{off + 8 + size}; skipped")
                    continue
                path = f"{prefix}{n}"
                with open(path + ".code", "wb") as out:
                    out.write(img[off + 8:off + 8 + size])
                r = subprocess.run([nvdisasm, "-b", arch, path + ".code"], capture_output=True, text=True)
                with open(path + ".sass", "w") as out:
                    out.write(r.stdout + r.stderr)
                if r.returncode != 0:
                    sys.exit(f"{nvdisasm} failed on {path}.code: {r.stderr.strip()}")
                with open(path + ".ctl", "w") as out:
                    out.write(control(img[off + 8:off + 8 + size], r.stdout))
                print(f"{path}.sass: {size} bytes of code from {f}")
                n += 1
    if n == 0:
        sys.exit(f"no NVDANVVM image under {root}")


if __name__ == "__main__":
    main()
