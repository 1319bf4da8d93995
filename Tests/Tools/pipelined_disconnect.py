#!/usr/bin/python3
"""Pipelined READs, then NBD_CMD_DISC at once, through libnbd.

    pipelined_disconnect.py URI COUNT [CERTIFICATES]

Issues COUNT 1 MiB reads without waiting, then nbd_aio_disconnect (libnbd sends
NBD_CMD_DISC, then shuts its sending side: shutdown(SHUT_WR), after a TLS close_notify
under TLS) and polls until the connection is closed. Prints a JSON object: how many
reads succeeded and failed, the SHA-256 of their data in request order, and whether
the connection ended closed (clean) or dead.
"""
import hashlib
import json
import sys

import nbd

from libnbd_connection import connect

uri, count = sys.argv[1], int(sys.argv[2])
handle = connect(uri, sys.argv[3] if len(sys.argv) > 3 else None)
size = handle.get_size()
results = {"ok": 0, "failed": 0}


def done(error):
    results["ok" if error.value == 0 else "failed"] += 1
    return 1


buffers = [nbd.Buffer(1 << 20) for _ in range(count)]
for index in range(count):
    handle.aio_pread(buffers[index], (index << 20) % size, completion=done)
handle.aio_disconnect(0)
error = None
try:
    while not handle.aio_is_closed() and not handle.aio_is_dead():
        handle.poll(-1)
except nbd.Error as failure:
    error = str(failure)
digest = hashlib.sha256()
for buffer in buffers:
    digest.update(buffer.to_bytearray())
print(json.dumps({
    "ok": results["ok"], "failed": results["failed"], "sha256": digest.hexdigest(),
    "closed": handle.aio_is_closed(), "error": error,
}))
