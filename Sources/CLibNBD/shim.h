// libnbd, the C client library behind nbdinfo, nbdcopy and fio's nbd engine.
// Debian 12 ships libnbd 1.14: check LIBNBD_HAVE_* before using newer calls.
#ifndef TIDEMARK_CLIBNBD_SHIM_H
#define TIDEMARK_CLIBNBD_SHIM_H

#include <libnbd.h>

#endif
