#!/usr/bin/python3
"""Hostile and careful NBD-over-TLS clients for the TLS integration tests.

Each mode prints one JSON object on stdout describing what the server did; the Swift
test decides what is right. Modes:
  inject     plaintext STRUCTURED_REPLY (ACKed), STARTTLS, TLS, GO, READ: reply magic
  samesegment STARTTLS with options after it in the same segment: what came back
  garbage    STARTTLS then garbage instead of a ClientHello
  stall      STARTTLS then half a TLS record header, then silence: when the server closed
  split      the whole TLS session with every client write sent one byte at a time
  plainlist  LIST in plaintext: every byte the server sent
"""
import json, socket, ssl, struct, sys, time

IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9

def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(path)
    return s

def recv_exact(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError("closed after %d of %d bytes" % (len(data), n))
        data += chunk
    return data

def greet(s):
    greeting = recv_exact(s, 18)
    assert greeting[:8] == b"NBDMAGIC", greeting
    s.sendall(struct.pack(">I", 3))

def option(code, data=b""):
    return struct.pack(">QII", IHAVEOPT, code, len(data)) + data

def go_payload(name):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", 0)

def read_reply(s):
    magic, opt, rtype, length = struct.unpack(">QIII", recv_exact(s, 20))
    assert magic == REPLY_MAGIC, hex(magic)
    return opt, rtype, recv_exact(s, length)

def read_until_ack(s):
    replies = []
    while True:
        opt, rtype, data = read_reply(s)
        replies.append(rtype)
        if rtype == 1 or rtype & 0x80000000:
            return replies

def drain(s, limit=1 << 16):
    data = b""
    s.settimeout(10)
    try:
        while len(data) < limit:
            chunk = s.recv(4096)
            if not chunk:
                return data, True
            data += chunk
    except socket.timeout:
        return data, False
    except OSError:
        return data, True
    return data, False

def context(certs):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs + "/ca-cert.pem")
    ctx.check_hostname = False
    return ctx

def tls_go_read(tls, export):
    tls.sendall(option(7, go_payload(export)))
    replies = read_until_ack(tls)
    tls.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 0x1234, 0, 512))
    magic = struct.unpack(">I", recv_exact(tls, 4))[0]
    return replies, magic

def main():
    mode, path, certs = sys.argv[1], sys.argv[2], sys.argv[3]
    export = sys.argv[4] if len(sys.argv) > 4 else "disk"
    s = connect(path)
    greet(s)
    result = {"mode": mode}
    if mode == "inject":
        s.sendall(option(8))
        result["sr_before_tls"] = read_until_ack(s)
        s.sendall(option(5))
        result["starttls"] = read_until_ack(s)
        tls = context(certs).wrap_socket(s)
        replies, magic = tls_go_read(tls, export)
        result["go"] = replies
        result["reply_magic"] = magic
    elif mode == "samesegment":
        s.sendall(option(5) + option(8) + option(7, go_payload(export)))
        data, closed = drain(s)
        result["bytes"] = data.hex()
        result["closed"] = closed
    elif mode == "garbage":
        s.sendall(option(5))
        result["starttls"] = read_until_ack(s)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256)) * 4)
        data, closed = drain(s)
        result["bytes"] = data.hex()
        result["closed"] = closed
    elif mode == "stall":
        s.sendall(option(5))
        result["starttls"] = read_until_ack(s)
        s.sendall(b"\x16\x03\x01")
        start = time.monotonic()
        s.settimeout(30)
        try:
            while s.recv(4096):
                pass
        except OSError:
            pass
        result["closed_after"] = time.monotonic() - start
    elif mode == "split":
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) if s.family != socket.AF_UNIX else None
        s.sendall(option(5))
        result["starttls"] = read_until_ack(s)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context(certs).wrap_bio(incoming, outgoing)
        sent = [0]
        def flush():
            data = outgoing.read()
            for i in range(len(data)):
                s.sendall(data[i:i + 1])
                sent[0] += 1
        def pump(call):
            while True:
                try:
                    value = call()
                    flush()
                    return value
                except ssl.SSLWantReadError:
                    flush()
                    chunk = s.recv(65536)
                    if not chunk:
                        raise EOFError("server closed")
                    incoming.write(chunk)
        pump(tls.do_handshake)
        pump(lambda: tls.write(option(7, go_payload(export))))
        buffered = b""
        def read_n(n):
            nonlocal buffered
            while len(buffered) < n:
                buffered += pump(lambda: tls.read(65536))
            out, buffered = buffered[:n], buffered[n:]
            return out
        replies = []
        while True:
            _, _, rtype, length = struct.unpack(">QIII", read_n(20))
            read_n(length)
            replies.append(rtype)
            if rtype == 1 or rtype & 0x80000000:
                break
        pump(lambda: tls.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, 7, 0, 4096)))
        header = read_n(16)
        result["go"] = replies
        result["reply_magic"] = struct.unpack(">I", header[:4])[0]
        result["data"] = read_n(4096).hex()
        result["bytes_sent_one_by_one"] = sent[0]
    elif mode == "plainlist":
        s.sendall(option(3) + option(6, go_payload(export)) + option(9, struct.pack(">I", len(export)) + export.encode() + struct.pack(">I", 0)))
        data, closed = drain(s, 4096)
        result["bytes"] = data.hex()
    print(json.dumps(result))

if __name__ == "__main__":
    main()
