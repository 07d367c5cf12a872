#!/usr/bin/env python3
"""Writes examples/tiny/input.safetensors: three packed sequences (lengths 5, 1, 42) of random
hidden states with random initial conv and ssm states, for the tiny config next to it.
Standard library only, so it runs anywhere; seeded, so it is reproducible."""
import json
import random
import struct
from pathlib import Path

here = Path(__file__).resolve().parent.parent / "examples" / "tiny"
cfg = json.loads((here / "config.json").read_text())
d_model, d_state, d_conv = cfg["d_model"], cfg["d_state"], cfg["d_conv"]
d_inner = cfg["expand"] * d_model
nheads = d_inner // cfg["headdim"]
conv_dim = d_inner + 2 * cfg["ngroups"] * d_state
lengths = [5, 1, 42]
cu = [0]
for n in lengths:
    cu.append(cu[-1] + n)
rng = random.Random(7)
n = len(lengths)


def gauss(count, scale):
    return [rng.gauss(0.0, scale) for _ in range(count)]


tensors = {
    "hidden_states": ("F32", [cu[-1], 1, d_model], gauss(cu[-1] * d_model, 1.0)),
    "cu_seqlens": ("I32", [n + 1], cu),
    "conv_state": ("F32", [n, conv_dim, d_conv], gauss(n * conv_dim * d_conv, 1.0)),
    "ssm_state": ("F32", [n, nheads, cfg["headdim"], d_state], gauss(n * d_inner * d_state, 0.5)),
}
header, blobs, offset = {}, [], 0
for name, (dtype, shape, values) in tensors.items():
    blob = struct.pack("<%d%s" % (len(values), "f" if dtype == "F32" else "i"), *values)
    header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
head = json.dumps(header, separators=(",", ":")).encode()
head += b" " * (-len(head) % 8)
(here / "input.safetensors").write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
print("wrote", here / "input.safetensors")
