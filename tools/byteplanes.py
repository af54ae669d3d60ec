#!/usr/bin/env python3
"""Reorders a file of 16-bit values into two byte planes (every even byte, then every odd byte)
and back, so that xz finds the repetition in the high bytes (sign, exponent and top mantissa
bits of f16 weights) that interleaving with the near-random low bytes hides. Any file works:
an odd length keeps its last byte at the end of the first plane. Used by tools/gpu-prepare.sh
for the f16 MiniLM it carries to the GPU machine (41.1 -> 39.0 MB with xz) and by
tools/gpu-check.sh to undo it there.

    python3 tools/byteplanes.py split IN OUT
    python3 tools/byteplanes.py join IN OUT
"""

import sys


def split(data: bytes) -> bytes:
    return data[0::2] + data[1::2]


def join(data: bytes) -> bytes:
    first = (len(data) + 1) // 2
    out = bytearray(len(data))
    out[0::2] = data[:first]
    out[1::2] = data[first:]
    return bytes(out)


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] not in ("split", "join"):
        print("usage: byteplanes.py split|join IN OUT", file=sys.stderr)
        return 2
    with open(sys.argv[2], "rb") as f:
        data = f.read()
    out = split(data) if sys.argv[1] == "split" else join(data)
    with open(sys.argv[3], "wb") as f:
        f.write(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
