import Dispatch

#if canImport(Glibc)
import Glibc
#endif

/// Turns SIGINT/SIGTERM into something `async` code can await.
final class SignalWaiter {
    private let stream: AsyncStream<Int32>
    private let sources: [any DispatchSourceSignal]

    init(signals: [Int32]) {
        let (stream, continuation) = AsyncStream<Int32>.makeStream()
        self.stream = stream
        self.sources = signals.map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: .global())
            source.setEventHandler { continuation.yield(number) }
            source.resume()
            return source
        }
    }

    /// Waits for the first of the signals.
    func wait() async -> Int32 {
        for await number in stream { return number }
        return SIGTERM
    }
}
