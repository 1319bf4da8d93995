import NBDClient

/// Walks the export with BLOCK_STATUS and turns the answers into a ``BackupPlan``.
///
/// One request carries both contexts — `base:allocation` and, for an incremental backup,
/// `qemu:dirty-bitmap:NAME` — so the two maps describe the same instant and cost one round
/// trip. The server may answer each context up to a different offset (or past the range);
/// the scanner advances to the smaller of the two ends and asks again.
struct ExtentScanner {
    /// The largest range asked for in one BLOCK_STATUS (the wire count is 32-bit).
    static let maximumRequest: UInt64 = 1 << 31

    let connection: NBDConnection
    let virtualSize: UInt64
    /// The dirty-bitmap context, or nil for a full backup.
    let bitmapContext: String?
    /// False when the server does not offer `base:allocation`: everything counts as data.
    let hasAllocation: Bool

    /// The plan: for a full backup, every range that is not known to read as zeroes; for
    /// an incremental one, every dirty range, as data or (when it reads as zeroes) zero.
    func plan() throws(BackupError) -> BackupPlan {
        var plan = BackupPlan(virtualSize: virtualSize)
        if bitmapContext == nil && !hasAllocation {
            plan.addData(offset: 0, length: virtualSize)
            return plan
        }
        var position: UInt64 = 0
        while position < virtualSize {
            let count = min(virtualSize - position, Self.maximumRequest)
            let reply: [String: [NBDExtent]]
            do {
                reply = try connection.blockStatus(count: count, offset: position)
            } catch {
                throw BackupError.connectionLost(detail: error.description)
            }
            let allocation = try extents(reply, NBDAllocationFlags.contextName, from: position, required: hasAllocation)
            let dirty = try bitmapContext.map { context throws(BackupError) in
                try extents(reply, context, from: position, required: true)
            }
            let end = try combine(allocation: allocation, dirty: dirty, from: position, into: &plan)
            guard end > position else {
                throw BackupError.blockStatusIncomplete(context: bitmapContext ?? NBDAllocationFlags.contextName, offset: position)
            }
            position = end
        }
        return plan
    }

    /// A context's extents as absolute (start, end, flags), or one all-data extent when the
    /// context is not required and absent.
    private func extents(
        _ reply: [String: [NBDExtent]], _ context: String, from position: UInt64, required: Bool
    ) throws(BackupError) -> [(start: UInt64, end: UInt64, flags: UInt32)] {
        guard let list = reply[context], !list.isEmpty else {
            if required { throw BackupError.blockStatusIncomplete(context: context, offset: position) }
            return [(position, virtualSize, 0)]
        }
        var result: [(start: UInt64, end: UInt64, flags: UInt32)] = []
        var start = position
        for extent in list {
            guard extent.length > 0 else { throw BackupError.blockStatusIncomplete(context: context, offset: start) }
            let end = min(start + UInt64(extent.length), virtualSize)
            result.append((start, end, extent.flags))
            start = end
            if start >= virtualSize { break }
        }
        return result
    }

    /// Intersects the two extent lists up to the shorter one's end, adds the resulting
    /// ranges to `plan`, and returns that end.
    private func combine(
        allocation: [(start: UInt64, end: UInt64, flags: UInt32)],
        dirty: [(start: UInt64, end: UInt64, flags: UInt32)]?,
        from position: UInt64, into plan: inout BackupPlan
    ) throws(BackupError) -> UInt64 {
        let allocationEnd = allocation.last?.end ?? position
        let end = min(allocationEnd, dirty?.last?.end ?? allocationEnd)
        let zeroFlag = NBDAllocationFlags.zero.rawValue
        var allocationIndex = 0
        var dirtyIndex = 0
        var cursor = position
        while cursor < end {
            while allocationIndex < allocation.count, allocation[allocationIndex].end <= cursor { allocationIndex += 1 }
            guard allocationIndex < allocation.count else { break }
            let allocated = allocation[allocationIndex]
            var pieceEnd = min(allocated.end, end)
            var isDirty = true
            if let dirty {
                while dirtyIndex < dirty.count, dirty[dirtyIndex].end <= cursor { dirtyIndex += 1 }
                guard dirtyIndex < dirty.count else { break }
                pieceEnd = min(pieceEnd, dirty[dirtyIndex].end)
                isDirty = dirty[dirtyIndex].flags & 1 != 0
            }
            let readsZero = hasAllocation && allocated.flags & zeroFlag != 0
            if isDirty {
                if !readsZero {
                    plan.addData(offset: cursor, length: pieceEnd - cursor)
                } else if dirty != nil {
                    plan.addZero(offset: cursor, length: pieceEnd - cursor)
                }
                // Full backup: zero ranges stay unallocated (no backing file: zeroes).
            }
            cursor = pieceEnd
        }
        return cursor
    }
}
