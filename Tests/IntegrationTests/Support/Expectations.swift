import Foundation
import NBDClient
import Testing

/// Runs `body` and returns the NBD error it threw, or nil if it succeeded.
func nbdError(_ body: () throws -> Void) -> NBDClientError? {
    do {
        try body()
        return nil
    } catch let error as NBDClientError {
        return error
    } catch {
        Issue.record("unexpected non-NBD error: \(error)")
        return nil
    }
}

/// Expects `body` to fail with a server error mapped to `expected` (an errno such as
/// `EINVAL`). Records an issue naming what happened instead.
func expectErrno(
    _ expected: Int32, _ what: String,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws -> Void
) {
    guard let error = nbdError(body) else {
        Issue.record("\(what): expected errno \(expected) (\(errnoName(expected))), but it succeeded", sourceLocation: sourceLocation)
        return
    }
    if error.errno != expected {
        Issue.record(
            "\(what): expected errno \(expected) (\(errnoName(expected))), got \(error.errno) (\(errnoName(error.errno))): \(error.message)",
            sourceLocation: sourceLocation)
    }
}

/// Checks that `connection` is alive and still serves reads after an error.
func expectUsable(
    _ connection: NBDConnection, _ what: String,
    sourceLocation: SourceLocation = #_sourceLocation
) {
    #expect(connection.isReady, "\(what): connection state \(connection.connectionState)", sourceLocation: sourceLocation)
    do {
        _ = try connection.pread(count: 4096, offset: 0)
    } catch {
        Issue.record("\(what): read after the error failed: \(error)", sourceLocation: sourceLocation)
    }
}

/// A readable errno name for failure messages.
func errnoName(_ code: Int32) -> String {
    switch code {
    case EPERM: "EPERM"
    case EIO: "EIO"
    case ENOMEM: "ENOMEM"
    case EINVAL: "EINVAL"
    case ENOSPC: "ENOSPC"
    case EOVERFLOW: "EOVERFLOW"
    case EOPNOTSUPP: "ENOTSUP"
    case ESHUTDOWN: "ESHUTDOWN"
    case ENOENT: "ENOENT"
    case ENOTCONN: "ENOTCONN"
    default: String(cString: strerror(code))
    }
}

/// The extents of one context turned into absolute (offset, length, flags) runs.
func absoluteExtents(_ extents: [NBDExtent], from offset: UInt64) -> [(offset: UInt64, length: UInt64, flags: UInt32)] {
    var position = offset
    var result: [(offset: UInt64, length: UInt64, flags: UInt32)] = []
    for extent in extents {
        result.append((position, UInt64(extent.length), extent.flags))
        position += UInt64(extent.length)
    }
    return result
}

/// The `base:allocation` flags covering `offset`, or nil if no extent covers it.
func allocationFlags(at offset: UInt64, in extents: [NBDExtent], from start: UInt64) -> NBDAllocationFlags? {
    for run in absoluteExtents(extents, from: start) where run.offset <= offset && offset < run.offset + run.length {
        return NBDAllocationFlags(rawValue: run.flags)
    }
    return nil
}

/// Follows block status across `[offset, offset + length)` (servers may stop short) and
/// returns the `base:allocation` runs covering it.
func allocationMap(
    _ connection: NBDConnection, offset: UInt64 = 0, length: UInt64
) throws -> [(offset: UInt64, length: UInt64, flags: UInt32)] {
    var result: [(offset: UInt64, length: UInt64, flags: UInt32)] = []
    var position = offset
    let end = offset + length
    while position < end {
        let status = try connection.blockStatus(count: end - position, offset: position)
        guard let extents = status[NBDAllocationFlags.contextName], !extents.isEmpty else {
            throw HarnessError("block status at \(position) returned no base:allocation extents: \(status)")
        }
        for run in absoluteExtents(extents, from: position) {
            guard run.length > 0 else { throw HarnessError("zero-length extent at \(run.offset)") }
            let clipped = min(run.length, end - run.offset)
            result.append((run.offset, clipped, run.flags))
            if run.offset + clipped >= end { break }
        }
        position = result.last.map { $0.offset + $0.length } ?? end
    }
    return result
}
