"""The libnbd connection the test tools open: plaintext, or TLS required with a CA
directory (libnbd's tls-certificates) when one is given."""
import nbd


def connect(uri, certificates=None):
    handle = nbd.NBD()
    if certificates:
        handle.set_tls(nbd.TLS_REQUIRE)
        handle.set_tls_certificates(certificates)
    handle.connect_uri(uri)
    return handle
