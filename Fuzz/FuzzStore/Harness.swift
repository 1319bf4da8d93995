// libFuzzer harness: the sidecar bitmap store (IMAGE.tidemark/) after a crash or tampering.
//
// Built on the public API only — BitmapStore.open(imagePath:imageSize:) and
// DirtyTracker(store:contents:) — so it keeps working while the on-disk format changes.
//
// Two valid stores are made at start-up with that API: one stopped cleanly, one "crashed"
// (writes journaled after the last save, never saved). Input:
//   [mode byte] then, when mode < 0x80, edits applied to a copy of baseline (mode & 1):
//     [file byte][op byte][2-byte offset][length byte][bytes]…  (op: overwrite, xor,
//     truncate, delete, append; file: one of the baseline's files, or a new journal)
//   or, when mode >= 0x80, raw files: [2-byte N][N bytes state.json][2-byte M][M bytes
//     data file named by the state's dataFile guess "bitmaps-1.dat"][rest: journal-1.log].
// Then the store is opened and handed to a DirtyTracker. Always: no trap, bounded memory,
// bitmap names unique. For edits, "a damaged store never loads as clean":
//   - edits of the bitmap data file, or a deleted journal: open fails, or every bitmap of
//     the baseline loads with at least the bits the baseline loads with;
//   - edits of state.json: open fails, or the store starts over (files moved aside, the
//     problem reported), or it reports a recovery or a problem, or the same superset holds
//     (a bitmap may go missing: that is reported to every client as "no such bitmap").
//   Edited journal bytes are only checked for no trap: the current journal has no header or
//   record count, so a truncated journal cannot be told from a shorter one.
import DirtyTracking
import FoundationEssentials
import FuzzSupport


#if canImport(Glibc)
import Glibc
#endif

let imageSize: UInt64 = 1 << 30
let root: String = {
    // tmpfs when there is one: every run copies a store and the tracker saves it (fsync).
    let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
    var template = Array("\(base)/tidemark-fuzz-store-XXXXXX".utf8CString)
    guard let path = mkdtemp(&template) else { fail("mkdtemp") }
    return String(cString: path)
}()
let files = FileManager.default

struct Baseline {
    var directory: String
    var names: [String]
    /// Dirty byte runs per bitmap name, as the valid store loads.
    var dirty: [String: [(UInt64, UInt64)]]
    var recovered: Bool
    var epoch: UInt64
}

func runs(_ bitmap: DirtyBitmap) -> [(UInt64, UInt64)] {
    var result: [(UInt64, UInt64)] = []
    bitmap.forEachDirtyRun(offset: 0, length: bitmap.size) { start, length in
        result.append((start, length))
        return true
    }
    return result
}

/// True when every byte of `inner` is inside a run of `outer` (both sorted, disjoint).
func covers(_ outer: [(UInt64, UInt64)], _ inner: [(UInt64, UInt64)]) -> Bool {
    var index = 0
    for (start, length) in inner {
        var position = start
        let end = start + length
        while position < end {
            while index < outer.count && outer[index].0 + outer[index].1 <= position { index += 1 }
            guard index < outer.count, outer[index].0 <= position else { return false }
            position = outer[index].0 + outer[index].1
        }
    }
    return true
}

func makeBaseline(_ name: String, crashed: Bool) -> Baseline {
    let image = root + "/" + name + ".img"
    do {
        let (store, contents) = try BitmapStore.open(imagePath: image, imageSize: imageSize)
        let tracker = try DirtyTracker(store: store, contents: contents)
        try tracker.add(name: "b0", persistent: true)
        try tracker.add(name: "b1", granularity: 4096, persistent: true)
        try tracker.add(name: "off", granularity: 1 << 20, persistent: true)
        for (offset, length) in [(0, 4096), (5 << 20, 1 << 20), (300 << 20, 70_000), ((1 << 30) - 512, 512)] as [(UInt64, UInt64)] {
            try tracker.recordModification(offset: offset, length: length)
        }
        try tracker.setRecording(name: "off", false)
        try tracker.save()
        for (offset, length) in [(100 << 20, 4096), (700 << 20, 65536), (129 << 20, 1)] as [(UInt64, UInt64)] {
            try tracker.recordModification(offset: offset, length: length)
        }
        if !crashed { try tracker.save(cleanShutdown: true) }
    } catch {
        fail("cannot make the \(name) baseline: \(error)")
    }
    let directory = BitmapStore.directory(forImage: image)
    // Load it as a restarted server would, from a copy (opening a crashed store saves).
    let copyImage = root + "/reference.img"
    copy(directory, to: BitmapStore.directory(forImage: copyImage))
    guard let (store, contents) = try? BitmapStore.open(imagePath: copyImage, imageSize: imageSize) else {
        fail("the \(name) baseline does not load")
    }
    _ = store
    let names = ((try? files.contentsOfDirectory(atPath: directory)) ?? []).filter { $0 != "lock" }.sorted()
    return Baseline(
        directory: directory, names: names,
        dirty: Dictionary(uniqueKeysWithValues: contents.bitmaps.map { ($0.name, runs($0.bitmap)) }),
        recovered: contents.recovered, epoch: contents.epoch)
}

/// Copies a store folder. Foundation's copy gives up on EINTR, and libFuzzer's timer
/// signals (-timeout) interrupt it now and then: a failed copy is tried again, from scratch.
func copy(_ source: String, to target: String) {
    var lastError: (any Error)?
    for _ in 0..<5 {
        try? files.removeItem(atPath: target)
        do {
            try files.copyItem(atPath: source, toPath: target)
            return
        } catch {
            lastError = error
        }
    }
    fail("copy \(source): \(lastError.map { "\($0)" } ?? "?")")
}

// POSIX, not Foundation's Data(contentsOf:): that leaks 4 KiB when the file is missing
// (swift-foundation in 6.3), which LeakSanitizer reports as the harness's leak.
func readFile(_ path: String) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    guard fd >= 0 else { return [] }
    defer { close(fd) }
    var result: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 65536)
    while true {
        let count = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        guard count > 0 else { break }
        result += chunk[0..<count]
    }
    return result
}

func writeFile(_ path: String, _ bytes: [UInt8]) {
    let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
    require(fd >= 0, "cannot write \(path)")
    bytes.withUnsafeBytes { raw in _ = write(fd, raw.baseAddress, raw.count) }
    close(fd)
}

let baselines = [makeBaseline("clean", crashed: false), makeBaseline("crashed", crashed: true)]
let workImage = root + "/work.img"
let workDirectory = BitmapStore.directory(forImage: workImage)

struct Touched { var state = false, data = false, journalBytes = false, journalDeleted = false }

func applyEdits(_ input: inout FuzzInput, _ baseline: Baseline) -> Touched {
    var touched = Touched()
    var edits = 0
    while input.remaining >= 5 && edits < 16 {
        edits += 1
        let fileIndex = Int(input.byte()) % (baseline.names.count + 1)
        let operation = input.byte() % 5
        let offset = Int(input.u16())
        let bytes = input.take(Int(input.byte()))
        let name = fileIndex < baseline.names.count ? baseline.names[fileIndex] : "journal-\(baseline.epoch + UInt64(offset % 3)).log"
        let path = workDirectory + "/" + name
        if name == "state.json" { touched.state = true }
        else if name.hasPrefix("bitmaps-") { touched.data = true }
        else if operation == 3 && name.hasPrefix("journal-") { touched.journalDeleted = true }
        else { touched.journalBytes = true }
        var content = readFile(path)
        switch operation {
        case 0:  // overwrite (extending the file if needed)
            let at = min(offset, content.count)
            if content.count < at + bytes.count { content += [UInt8](repeating: 0, count: at + bytes.count - content.count) }
            content.replaceSubrange(at..<(at + bytes.count), with: bytes)
        case 1:  // xor
            guard !content.isEmpty else { continue }
            for (index, byte) in bytes.enumerated() { content[(offset + index) % content.count] ^= byte | 1 }
        case 2:
            content.removeLast(content.count - min(content.count, offset))
        case 3:
            try? files.removeItem(atPath: path)
            continue
        default:
            content += bytes
        }
        writeFile(path, content)
    }
    return touched
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    fuzz(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}

func fuzz(_ buffer: UnsafeRawBufferPointer) {
    var input = FuzzInput(buffer)
    let mode = input.byte()
    try? files.removeItem(atPath: workDirectory)
    let baseline = baselines[Int(mode & 1)]
    var touched: Touched?
    if mode < 0x80 {
        copy(baseline.directory, to: workDirectory)
        touched = applyEdits(&input, baseline)
    } else {
        try? files.createDirectory(atPath: workDirectory, withIntermediateDirectories: true)
        writeFile(workDirectory + "/state.json", input.take(Int(input.u16())))
        writeFile(workDirectory + "/bitmaps-1.dat", input.take(Int(input.u16())))
        writeFile(workDirectory + "/journal-1.log", input.rest())
    }

    let opened: (BitmapStore, BitmapStore.Contents)
    do {
        opened = try BitmapStore.open(imagePath: workImage, imageSize: imageSize)
    } catch {
        return  // reported as damage: fine
    }
    let contents = opened.1
    let names = contents.bitmaps.map(\.name)
    require(Set(names).count == names.count, "bitmap names loaded twice: \(names)")
    for bitmap in contents.bitmaps {
        require(bitmap.bitmap.size == imageSize, "bitmap \(bitmap.name) of \(bitmap.bitmap.size) bytes")
    }

    // A store too damaged to trust starts over: its files are moved aside, nothing is
    // loaded, and the problem is reported (bitmaps created on it then start entirely dirty).
    if contents.damaged {
        require(contents.bitmaps.isEmpty, "a store that started over loaded bitmaps \(names)")
        require(!contents.problems.isEmpty, "a store started over without saying why")
    } else if let touched, !touched.journalBytes {
        let lenient = touched.state && (contents.recovered || !contents.problems.isEmpty)
        if !lenient {
            for (name, dirty) in baseline.dirty {
                guard let loaded = contents.bitmaps.first(where: { $0.name == name }) else {
                    require(touched.state, "bitmap \(name) vanished after \(touched)")
                    continue
                }
                require(covers(runs(loaded.bitmap), dirty),
                        "bitmap \(name) loaded with fewer bits than the valid store (\(touched), recovered: \(contents.recovered))")
            }
        }
    }
    // The tracker must accept whatever the store accepted.
    do {
        _ = try DirtyTracker(store: opened.0, contents: contents)
    } catch {
        require(false, "DirtyTracker refused a store that opened: \(error)")
    }
}
