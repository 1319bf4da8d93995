import Dispatch

#if canImport(Glibc)
import Glibc
#endif

/// Something `async` code can await until the server should stop: SIGINT, SIGTERM, or a
/// `quit` over the control socket.
final class ShutdownTrigger: Sendable {
    private let stream: AsyncStream<String>
    private let continuation: AsyncStream<String>.Continuation
    private let sources: [DispatchSourceSignalBox]

    /// Dispatch sources are thread-safe but not marked Sendable.
    private struct DispatchSourceSignalBox: @unchecked Sendable {
        let source: any DispatchSourceSignal
    }

    init(signals: [Int32]) {
        let (stream, continuation) = AsyncStream<String>.makeStream()
        self.stream = stream
        self.continuation = continuation
        // No SIG_IGN first: until a source is registered a signal keeps its default
        // action and ends the process, where an ignored one would be lost for good.
        self.sources = signals.map { number in
            let source = SignalSource.watching(number) {
                continuation.yield(number == SIGINT ? "SIGINT" : "SIGTERM")
            }
            return DispatchSourceSignalBox(source: source)
        }
    }

    /// Asks the server to stop.
    func trigger(_ reason: String) {
        continuation.yield(reason)
    }

    /// Waits for the first request to stop and returns its reason.
    func wait() async -> String {
        for await reason in stream { return reason }
        return "end of input"
    }
}
