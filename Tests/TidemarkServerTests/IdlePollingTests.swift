import Glibc
import NIOCore
import NIOEmbedded
import Testing
@testable import TidemarkServer

@Suite("Adaptive idle polling")
struct IdlePollingTests {
    @Test("the window starts closed, doubles from 4 µs on gaps it would have caught, and stops at the maximum")
    func windowGrows() {
        var window = AdaptivePollWindow(maximum: 50_000)
        #expect(window.current == 0)
        window.record(idleNanoseconds: 0)
        #expect(window.current == 0, "a gap of nothing teaches nothing")
        window.record(idleNanoseconds: 45_000)
        #expect(window.current == AdaptivePollWindow.initial)
        var seen: [UInt64] = []
        for _ in 0..<6 {
            window.record(idleNanoseconds: 45_000)
            seen.append(window.current)
        }
        #expect(seen == [8_000, 16_000, 32_000, 50_000, 50_000, 50_000])
        var caught = AdaptivePollWindow(maximum: 50_000)
        for _ in 0..<6 { caught.record(idleNanoseconds: 10_000) }
        #expect(caught.current == 16_000, "it grows only until it covers the gaps")
    }

    @Test("gaps longer than the maximum halve the window down to closed")
    func windowShrinks() {
        var window = AdaptivePollWindow(maximum: 32_000)
        for _ in 0..<5 { window.record(idleNanoseconds: 30_000) }
        #expect(window.current == 32_000)
        var seen: [UInt64] = []
        for _ in 0..<4 {
            window.record(idleNanoseconds: 1_000_000)
            seen.append(window.current)
        }
        #expect(seen == [16_000, 8_000, 4_000, 0])
        window.record(idleNanoseconds: 1_000_000)
        #expect(window.current == 0)
    }

    @Test("a maximum of 0 never opens the window")
    func windowOff() {
        var window = AdaptivePollWindow(maximum: 0)
        for gap: UInt64 in [1, 1_000, 100_000] { window.record(idleNanoseconds: gap) }
        #expect(window.current == 0)
    }

    /// Runs `body` with `count` connected pairs of stream sockets, closed after it: the
    /// poller watches the first of a pair, the test writes on the second.
    static func withSocketPairs(_ count: Int, _ body: ([(watched: CInt, peer: CInt)]) throws -> Void) throws {
        var pairs: [(watched: CInt, peer: CInt)] = []
        defer { for pair in pairs { close(pair.watched); close(pair.peer) } }
        for _ in 0..<count {
            var descriptors: [CInt] = [0, 0]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &descriptors) == 0 else {
                throw IOError(errnoCode: errno, reason: "socketpair")
            }
            pairs.append((descriptors[0], descriptors[1]))
        }
        try body(pairs)
    }

    /// A poller whose window has opened: one idle gap of a few microseconds.
    static func trainedPoller(members: [CInt], loop: EmbeddedEventLoop) -> IdlePoller {
        let poller = IdlePoller(maximumNanoseconds: 1_000_000, eventLoop: loop, statistics: IdlePollStatistics())
        for member in members { poller.joined(member) }
        for member in members {
            poller.becameIdle(member)
            usleep(20)
            poller.inputArrived(member)
        }
        return poller
    }

    @Test("with every connection idle, a readable socket ends the poll; a silent one lets the window run out")
    func pollOutcomes() throws {
        try Self.withSocketPairs(1) { pairs in
            let loop = EmbeddedEventLoop()
            let (watched, peer) = pairs[0]
            let untrained = IdlePoller(maximumNanoseconds: 1_000_000, eventLoop: loop, statistics: IdlePollStatistics())
            untrained.joined(watched)
            untrained.becameIdle(watched)
            #expect(untrained.pollIdleConnections() == .skipped, "a closed window does not poll")

            let poller = Self.trainedPoller(members: [watched], loop: loop)
            #expect(poller.currentWindow > 0)
            poller.becameIdle(watched)
            #expect(poller.pollIdleConnections() == .expired)

            var byte: UInt8 = 1
            #expect(write(peer, &byte, 1) == 1)
            #expect(poller.pollIdleConnections() == .caught)
            #expect(poller.statistics.caught == 1)
            #expect(poller.statistics.expired == 1)
        }
    }

    @Test("becoming idle schedules one poll on the loop, and only once every member is idle")
    func pollsOnlyWhenAllIdle() throws {
        try Self.withSocketPairs(2) { pairs in
            let loop = EmbeddedEventLoop()
            let first = pairs[0].watched
            let (second, secondPeer) = pairs[1]
            let poller = Self.trainedPoller(members: [first, second], loop: loop)
            var byte: UInt8 = 7
            #expect(write(secondPeer, &byte, 1) == 1)

            poller.becameIdle(first)
            #expect(poller.pollIdleConnections() == .skipped, "the second connection is busy")
            loop.run()
            #expect(poller.statistics.caught + poller.statistics.expired == 0)

            // Input waits on the second socket: the scheduled poll sees it at once.
            poller.becameIdle(second)
            loop.run()
            #expect(poller.statistics.caught == 1)

            // A connection that leaves is not waited for, and its socket is not polled.
            poller.inputArrived(second)
            poller.removed(second)
            poller.becameIdle(first)
            loop.run()
            #expect(poller.statistics.expired == 1)
            #expect(poller.statistics.caught == 1)
        }
    }

    @Test("a loop with more connections than it polls over sleeps instead, even with input waiting")
    func tooManyToPoll() throws {
        try Self.withSocketPairs(IdlePoller.maximumPolledConnections + 1) { pairs in
            let loop = EmbeddedEventLoop()
            let poller = Self.trainedPoller(members: pairs.map(\.watched), loop: loop)
            var byte: UInt8 = 3
            #expect(write(pairs[0].peer, &byte, 1) == 1)
            for pair in pairs { poller.becameIdle(pair.watched) }
            #expect(poller.pollIdleConnections() == .skipped)
            // One leaves: the rest fit, and the waiting input ends the poll.
            poller.removed(pairs[pairs.count - 1].watched)
            #expect(poller.pollIdleConnections() == .caught)
        }
    }

    @Test("a read of two requests or more marks a pipelining client; 16 single-request reads in a row clear it")
    func pacing() {
        var pacing = ClientPacing()
        #expect(pacing.waitsForEachReply, "a new client is taken to wait for each reply")
        for _ in 0..<100 { pacing.readCompleted(requests: 1) }
        #expect(pacing.waitsForEachReply)
        pacing.readCompleted(requests: 0)
        #expect(pacing.waitsForEachReply, "a read with only part of a request says nothing")
        pacing.readCompleted(requests: 2)
        #expect(!pacing.waitsForEachReply)
        for _ in 0..<(ClientPacing.probation - 1) { pacing.readCompleted(requests: 1) }
        pacing.readCompleted(requests: 0)
        #expect(!pacing.waitsForEachReply, "\(ClientPacing.probation - 1) single reads and an empty one are not enough")
        pacing.readCompleted(requests: 5)
        for _ in 0..<(ClientPacing.probation - 1) { pacing.readCompleted(requests: 1) }
        #expect(!pacing.waitsForEachReply, "a new batch starts the count again")
        pacing.readCompleted(requests: 1)
        #expect(pacing.waitsForEachReply)
    }

    @Test("idle pipelining clients alone start no poll; one idle client that waits for each reply does, and the poll watches them all")
    func pollOnlyForWaitingClients() throws {
        try Self.withSocketPairs(2) { pairs in
            let loop = EmbeddedEventLoop()
            let waiting = pairs[0].watched
            let (pipelining, pipeliningPeer) = pairs[1]
            let poller = Self.trainedPoller(members: [waiting, pipelining], loop: loop)

            poller.becameIdle(pipelining, wantsPoll: false)
            poller.becameIdle(waiting, wantsPoll: false)
            loop.run()
            #expect(poller.pollIdleConnections() == .skipped)
            #expect(poller.statistics.caught + poller.statistics.expired == 0)

            // The first client's next request; then it is idle again and waits for each reply.
            poller.inputArrived(waiting)
            var byte: UInt8 = 5
            #expect(write(pipeliningPeer, &byte, 1) == 1)
            poller.becameIdle(waiting, wantsPoll: true)
            loop.run()
            #expect(poller.statistics.caught == 1, "the pipelining client's input ends the poll the other one started")

            // Once the waiting client's input arrived, only the pipelining one is idle: no poll.
            poller.inputArrived(waiting)
            poller.becameIdle(waiting, wantsPoll: false)
            #expect(poller.pollIdleConnections() == .skipped)
        }
    }
}
