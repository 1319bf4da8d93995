import ArgumentParser
import TidemarkService

/// `--log-format text|json`, with its choices listed in `--help` and completions.
extension LogFormat: ExpressibleByArgument {}
