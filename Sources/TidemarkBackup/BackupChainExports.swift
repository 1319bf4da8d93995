// The backup directory, manifest, qcow2 reading and error types moved below the server
// (module BackupChain); callers of TidemarkBackup keep seeing them through this module.
@_exported import BackupChain
