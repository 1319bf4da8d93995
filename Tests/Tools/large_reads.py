#!/usr/bin/python3
"""Large pipelined READs through libnbd, for the memory tests.

    large_reads.py URI REQUEST_BYTES IN_FLIGHT ROUNDS [CERTIFICATES]

Each round sends IN_FLIGHT reads of REQUEST_BYTES at once (offsets walk the export) and
waits for all of them. Prints a JSON object: the bytes read and their SHA-256 in request
order, so the caller can check the data too.
"""
import hashlib
import json
import sys

import nbd

from libnbd_connection import connect

uri, request_bytes, in_flight, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
handle = connect(uri, sys.argv[5] if len(sys.argv) > 5 else None)
size = handle.get_size()
buffers = [nbd.Buffer(request_bytes) for _ in range(in_flight)]
digest = hashlib.sha256()
total = 0
slot = 0
for _ in range(rounds):
    offsets = []
    cookies = []
    for index in range(in_flight):
        offset = (slot * request_bytes) % (size - size % request_bytes)
        slot += 1
        offsets.append(offset)
        cookies.append(handle.aio_pread(buffers[index], offset))
    for cookie in cookies:
        while not handle.aio_command_completed(cookie):
            handle.poll(-1)
    for index in range(in_flight):
        digest.update(buffers[index].to_bytearray())
        total += request_bytes
handle.shutdown()
print(json.dumps({"bytes": total, "sha256": digest.hexdigest()}))
