#if canImport(Glibc)
import Glibc
#endif

/// Loading and recovery: the store must tell a complete store from a damaged one, and
/// load whatever it cannot prove complete as dirty. Each rule and why:
///
/// - `state.json` missing while other store files exist, or unreadable, or failing its
///   checksum: nothing in the store can be trusted. The files are moved (not deleted:
///   evidence) into `damaged-TIMESTAMP/`, and a fresh store starts with a generation above
///   any recorded one, flagged `damaged` so bitmaps created at open start entirely dirty.
/// - `state.json` of a newer format: refused (`.storeCorrupt`), so a downgrade never
///   destroys a newer server's store.
/// - The image has another size: every bitmap keeps its name and flags but is re-created
///   at the new size, entirely dirty.
/// - A bitmap whose data fails its checksum (or is missing or truncated): that bitmap is
///   entirely dirty.
/// - After an unclean stop (`cleanShutdown` false) the journal of the manifest's epoch
///   must exist; if it or any later journal is missing or damaged, every recording bitmap
///   and every pending checkpoint increment is entirely dirty.
///
/// Any of these bumps the generation (as an unclean stop does) and adds a problem naming
/// the file to `Contents.problems`.
extension BitmapStore {
    func load() throws(BitmapError) -> Contents {
        removeTemporaries()
        guard let bytes = try FileIO.readFile(statePath) else {
            let debris = storeFiles()
            guard debris.isEmpty else {
                return try startOver(
                    reason: "state.json is missing but \(debris.joined(separator: ", ")) exist", readable: nil)
            }
            return Contents(bitmaps: [], generation: 0, epoch: 0, recovered: false)
        }
        switch StoredState.decodeChecked(bytes) {
        case .failure(let damage):
            return try startOver(reason: damage.reason, readable: damage.readable)
        case .success(let state):
            guard StoredState.readableVersions.contains(state.version) else {
                throw .storeCorrupt(
                    path: statePath,
                    reason: "format version \(state.version) is newer than this Tidemark reads (up to \(StoredState.currentVersion))")
            }
            if let damage = Self.implausibility(of: state) {
                return try startOver(reason: damage, readable: nil)
            }
            return try load(state)
        }
    }

    /// Counters far beyond any real store's: the tracker adds to them (the epoch at every
    /// save, the generation at every recovery), so values near 2^64 would trap later.
    static let counterLimit: UInt64 = 1 << 62

    /// Why a manifest that passed its checksum still cannot describe a real store (it was
    /// written by hand or by something else): counters out of range, a bitmap listed twice.
    static func implausibility(of state: StoredState) -> String? {
        guard state.epoch < counterLimit, state.generation < counterLimit,
            (state.checkpointCounter ?? 0) < counterLimit
        else { return "its epoch, generation or checkpoint count is out of range" }
        var names = Set<String>()
        for entry in state.bitmaps where !names.insert(entry.name).inserted {
            return "bitmap '\(entry.name)' is listed twice"
        }
        return nil
    }

    private func load(_ state: StoredState) throws(BitmapError) -> Contents {
        var problems: [String] = []
        let sizeChanged = state.imageSize != imageSize
        if sizeChanged {
            problems.append(
                "bitmap store '\(statePath)' describes an image of \(state.imageSize) bytes but the image has \(imageSize): it was resized while no server ran; every bitmap is kept at the new size, entirely dirty")
        }
        var data: [UInt8]?
        let dataPath = dataPath(state.dataFile)
        if !state.bitmaps.isEmpty && !sizeChanged {
            if !state.dataFile.contains("/") { data = try FileIO.readFile(dataPath) }
            if data == nil {
                problems.append("bitmap data file '\(dataPath)' is missing: every bitmap is entirely dirty")
            }
        }
        var bitmaps: [Contents.Bitmap] = []
        var position = 0
        for entry in state.bitmaps {
            var granularity = entry.granularity
            if !BitmapLimits.isValidGranularity(granularity) {
                granularity = BitmapLimits.defaultGranularity
                problems.append(
                    "bitmap '\(entry.name)' in '\(statePath)' has an invalid granularity \(entry.granularity): it is now \(granularity) and entirely dirty")
            }
            var loaded: DirtyBitmap?
            if let data, granularity == entry.granularity {
                let (byteCount, overflow) = entry.wordCount.multipliedReportingOverflow(by: 8)
                if entry.wordCount >= 0, !overflow, byteCount <= data.count - position {
                    let words = FileIO.decodeWords(data[position..<(position + byteCount)])
                    position += byteCount
                    if Checksum.fnv1a(words) != entry.checksum {
                        problems.append(
                            "bitmap '\(entry.name)' in '\(dataPath)' fails its checksum: it is entirely dirty")
                    } else if let bitmap = DirtyBitmap(size: imageSize, granularity: granularity, leafWords: words) {
                        loaded = bitmap
                    } else {
                        problems.append(
                            "bitmap '\(entry.name)' in '\(dataPath)' does not match the image size: it is entirely dirty")
                    }
                } else {
                    position = data.count
                    problems.append("bitmap '\(entry.name)' in '\(dataPath)' is truncated: it is entirely dirty")
                }
            }
            bitmaps.append(.init(
                name: entry.name, bitmap: loaded ?? Self.entirelyDirty(size: imageSize, granularity: granularity),
                recording: entry.recording, checkpointOf: entry.checkpointOf, consumed: entry.consumed ?? false,
                lineage: entry.lineage ?? CheckpointLineage(), checkpointID: entry.checkpointID,
                abortOnDisconnect: entry.abortOnDisconnect ?? true))
        }
        let recovered = !state.cleanShutdown
        if recovered && !sizeChanged {
            switch journaledRegions(since: state.epoch, version: state.version) {
            case .success(let regions):
                for region in regions {
                    let offset = region * Self.regionSize
                    for index in bitmaps.indices where bitmaps[index].recording {
                        bitmaps[index].bitmap.markDirty(offset: offset, length: Self.regionSize)
                    }
                }
            case .failure(let damage):
                problems.append(
                    "\(damage.reason): the writes since the last save are unknown, so every recording bitmap and pending checkpoint is entirely dirty")
                for index in bitmaps.indices where bitmaps[index].recording || bitmaps[index].checkpointOf != nil {
                    bitmaps[index].bitmap = Self.entirelyDirty(size: imageSize, granularity: bitmaps[index].bitmap.granularity)
                }
            }
        }
        let generation = recovered || !problems.isEmpty ? state.generation + 1 : state.generation
        return Contents(
            bitmaps: bitmaps, generation: generation, epoch: state.epoch, recovered: recovered,
            checkpointCounter: state.checkpointCounter ?? 0, damaged: false, problems: problems)
    }

    static func entirelyDirty(size: UInt64, granularity: UInt64) -> DirtyBitmap {
        var bitmap = DirtyBitmap(size: size, granularity: granularity)
        if bitmap.granuleCount > 0 { bitmap.setBits(0...(bitmap.granuleCount - 1)) }
        return bitmap
    }

    /// Regions recorded in every journal of epoch `epoch` or later; a failure when the
    /// journal of `epoch` is missing or any of them is damaged.
    private func journaledRegions(since epoch: UInt64, version: Int) -> Result<Set<UInt64>, JournalFormat.Damage> {
        var regions = Set<UInt64>()
        var foundRequired = false
        for name in FileIO.listDirectory(directory) {
            guard let number = Self.epochNumber(name, prefix: "journal-", suffix: ".log"), number >= epoch else { continue }
            let path = directory + "/" + name
            let bytes: [UInt8]
            do {
                guard let read = try FileIO.readFile(path) else { continue }
                bytes = read
            } catch {
                return .failure(.init(reason: "journal '\(path)' cannot be read (\(error))"))
            }
            if number == epoch { foundRequired = true }
            if version == 1 && JournalFormat.parseHeader(bytes) == nil {
                // Format 1: bare little-endian ids; a torn last word is ignored.
                for region in FileIO.decodeWords(bytes[...]) {
                    guard region < regionCount else {
                        return .failure(.init(reason: "journal '\(path)' names region \(region) beyond the image"))
                    }
                    regions.insert(region)
                }
                continue
            }
            switch JournalFormat.parse(bytes, epoch: number, regionCount: regionCount) {
            case .success(let parsed): regions.formUnion(parsed.regions)
            case .failure(let damage): return .failure(.init(reason: "journal '\(path)' is damaged (\(damage.reason))"))
            }
        }
        guard foundRequired else {
            return .failure(.init(reason: "journal '\(journalPath(epoch))' of the unfinished epoch is missing"))
        }
        return .success(regions)
    }

    // MARK: - Starting over

    /// Store files other than the lock and view sidecars: what a manifest would describe.
    private func storeFiles() -> [String] {
        FileIO.listDirectory(directory).filter { name in
            Self.epochNumber(name, prefix: "journal-", suffix: ".log") != nil
                || Self.epochNumber(name, prefix: "bitmaps-", suffix: ".dat") != nil
                || name.hasPrefix("damaged-")
        }.sorted()
    }

    /// Temporary files of writes that never completed (atomic writes, journals prepared
    /// but never used): nothing refers to them.
    private func removeTemporaries() {
        for name in FileIO.listDirectory(directory) where name.hasSuffix(".tmp") {
            if name.hasPrefix("journal-") || name.hasPrefix("bitmaps-") || name.hasPrefix("state.json") {
                unlink(directory + "/" + name)
            }
        }
    }

    /// Moves every store file into `damaged-TIMESTAMP/` and describes a fresh store whose
    /// generation and epoch are above anything recorded, here or in earlier damaged folders.
    private func startOver(reason: String, readable: StoredState?) throws(BitmapError) -> Contents {
        var generation = readable?.generation ?? 0
        var epoch = readable?.epoch ?? 0
        // Checkpoint names must not repeat even across a damaged store: keep counting from
        // the highest count any readable manifest recorded.
        var checkpointCounter = readable?.checkpointCounter ?? 0
        var folders = [directory]
        for name in FileIO.listDirectory(directory) where name.hasPrefix("damaged-") {
            folders.append(directory + "/" + name)
        }
        for folder in folders {
            for name in FileIO.listDirectory(folder) {
                if let number = Self.epochNumber(name, prefix: "journal-", suffix: ".log") {
                    epoch = max(epoch, number)
                    if let bytes = try? FileIO.readFile(folder + "/" + name), let header = JournalFormat.parseHeader(bytes) {
                        generation = max(generation, header.generation)
                    }
                } else if name == "state.json", let bytes = try? FileIO.readFile(folder + "/" + name),
                    case .success(let state) = StoredState.decodeChecked(bytes)
                {
                    generation = max(generation, state.generation)
                    epoch = max(epoch, state.epoch)
                    checkpointCounter = max(checkpointCounter, state.checkpointCounter ?? 0)
                }
            }
        }
        // Out-of-range values found in damaged files are not carried on (they would trap).
        generation = generation < Self.counterLimit ? generation + 1 : 1
        epoch = epoch < Self.counterLimit ? epoch + 1 : 1
        if checkpointCounter >= Self.counterLimit { checkpointCounter = 0 }
        let toMove = FileIO.listDirectory(directory).filter { name in
            name == "state.json" || Self.epochNumber(name, prefix: "journal-", suffix: ".log") != nil
                || Self.epochNumber(name, prefix: "bitmaps-", suffix: ".dat") != nil
        }.sorted()
        var moved = "no files"
        if !toMove.isEmpty {
            let aside = try makeDamagedFolder()
            for name in toMove {
                guard rename(directory + "/" + name, aside + "/" + name) == 0 else {
                    throw FileIO.failure(directory + "/" + name, "cannot move it to \(aside)", errno)
                }
            }
            try FileIO.syncDirectory(aside)
            try FileIO.syncDirectory(directory)
            moved = "\(toMove.joined(separator: ", ")) moved to '\(aside)'"
        }
        let problem =
            "bitmap store '\(statePath)' is damaged (\(reason)); its bitmaps cannot be trusted: \(moved); a fresh store starts at generation \(generation) and bitmaps created now start entirely dirty"
        return Contents(
            bitmaps: [], generation: generation, epoch: epoch, recovered: false, checkpointCounter: checkpointCounter,
            damaged: true, problems: [problem])
    }

    private func makeDamagedFolder() throws(BitmapError) -> String {
        var now = time(nil)
        var parts = tm()
        gmtime_r(&now, &parts)
        func padded(_ value: Int32, _ width: Int) -> String {
            let digits = String(value)
            return String(repeating: "0", count: max(0, width - digits.count)) + digits
        }
        let stamp =
            padded(parts.tm_year + 1900, 4) + padded(parts.tm_mon + 1, 2) + padded(parts.tm_mday, 2) + "T"
            + padded(parts.tm_hour, 2) + padded(parts.tm_min, 2) + padded(parts.tm_sec, 2) + "Z"
        var path = directory + "/damaged-" + stamp
        var suffix = 1
        while mkdir(path, 0o755) != 0 {
            guard errno == EEXIST, suffix < 1000 else { throw FileIO.failure(path, "cannot create", errno) }
            suffix += 1
            path = directory + "/damaged-\(stamp)-\(suffix)"
        }
        return path
    }
}
