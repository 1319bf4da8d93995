import ArgumentParser
import TidemarkTLS

/// `--tls off|on|require`, with its choices listed in `--help` and completions.
extension TLSMode: ExpressibleByArgument {}
