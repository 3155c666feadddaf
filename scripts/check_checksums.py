#!/usr/bin/env python3
"""Verify kutta's checksums in safetensors files without kutta: an independent reading of the
format that trainer/src/integrity.rs writes (and a way to check a checkpoint after copying it
between clusters).

    python3 -m venv /tmp/ck && /tmp/ck/bin/pip install safetensors numpy crc32c
    /tmp/ck/bin/python scripts/check_checksums.py runs/RUN/checkpoint-*.safetensors runs/RUN/model.safetensors

The format, in the safetensors metadata (`__metadata__`, string values):
  kutta.crc32c.tensors  JSON object: tensor name -> CRC32C of its bytes, 8 lower-case hex digits
  kutta.crc32c.header   CRC32C of the file's first 8 + N bytes (length prefix and JSON header,
                        padding included) with these 8 digits read as "00000000"
Exit status 0 when every file is intact, 1 otherwise (one line per file either way).
"""

import json
import struct
import sys

import crc32c
from safetensors.numpy import load_file

KEY = b'"kutta.crc32c.header":"'


def check(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    if "kutta.crc32c.header" not in meta:
        return "no kutta checksums"
    at = data.index(KEY) + len(KEY)
    recorded = data[at : at + 8].decode()
    computed = format(crc32c.crc32c(data[:at] + b"00000000" + data[at + 8 : 8 + n]), "08x")
    if recorded != computed:
        return f"the header is damaged (CRC32C {computed}, recorded {recorded})"
    sums = json.loads(meta["kutta.crc32c.tensors"])
    for name, info in sorted(header.items()):
        lo, hi = info["data_offsets"]
        got = format(crc32c.crc32c(data[8 + n + lo : 8 + n + hi]), "08x")
        if got != sums.get(name):
            return f"tensor `{name}` is damaged (CRC32C {got}, recorded {sums.get(name)})"
    load_file(path)  # and the reference reader loads it
    return None


def main():
    bad = 0
    for path in sys.argv[1:]:
        try:
            problem = check(path)
        except Exception as e:  # a file too damaged to parse
            problem = f"unreadable: {e}"
        print(f"{path}: {problem or 'intact (header and every tensor match; safetensors loads it)'}")
        bad += problem is not None
    return 1 if bad or len(sys.argv) < 2 else 0


if __name__ == "__main__":
    sys.exit(main())
