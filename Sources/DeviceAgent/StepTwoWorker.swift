#if canImport(Glibc)
import Glibc
#endif

/// Step 2 on a thread of its own (`Configuration.stepTwoThread`): reads the staged
/// blocks back in order and feeds them to the verification (hash, decrypt,
/// inflate, the components' writes), while the receiver's loop goes on draining
/// the socket. With a compressed payload one thread cannot do both at a gigabit:
/// inflating 110 MB/s of compressed input takes most of a core by itself, the
/// socket overflows and the repair tail grows (bench/RESULTS.md, issue 13).
///
/// The loop publishes how far the payload is staged without a gap (`stagedUpTo`);
/// the worker verifies up to there and waits for more. The verification and its
/// sink belong to the worker from `start` until it is idle with every block
/// consumed, failed, or cancelled; the loop then finishes step 2 itself. Staging
/// is only read here (the loop writes other blocks of the same files meanwhile:
/// `pread` and `pwrite` of distinct ranges).
final class StepTwoWorker: @unchecked Sendable {
    private let blockCount: Int
    private let feed: (Int) throws(ReceiveFailure) -> Void
    // Allocated, not stored inline: pthread objects must not move.
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let wake = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var thread: pthread_t?
    // Guarded by `mutex`.
    private var stagedUpTo = 0
    private var cancelled = false
    private var consumed = 0
    private var failure: ReceiveFailure?

    /// `feed` reads staged block b back and gives it to the verification (the one
    /// the loop uses without a thread); `blockCount` blocks in all.
    init(blockCount: Int, feed: @escaping (Int) throws(ReceiveFailure) -> Void) {
        self.blockCount = blockCount
        self.feed = feed
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(wake, nil)
    }

    deinit {
        pthread_cond_destroy(wake)
        pthread_mutex_destroy(mutex)
        wake.deallocate()
        mutex.deallocate()
    }

    func start(stagedUpTo n: Int) {
        precondition(thread == nil, "started once")
        stagedUpTo = n
        var t = pthread_t()
        let box = Unmanaged.passRetained(self)
        let rc = pthread_create(&t, nil, { raw in
            let worker = Unmanaged<StepTwoWorker>.fromOpaque(raw!).takeRetainedValue()
            worker.run()
            return nil
        }, box.toOpaque())
        precondition(rc == 0, "pthread_create: \(rc)")
        thread = t
    }

    /// Blocks 0..<n are staged.
    func staged(upTo n: Int) {
        locked {
            guard n > stagedUpTo else { return }
            stagedUpTo = n
            pthread_cond_signal(wake)
        }
    }

    /// Consumed blocks and the failure, if any, as of now.
    var progress: (consumed: Int, failure: ReceiveFailure?) { locked { (consumed, failure) } }

    /// Stops the worker and waits for its thread (after a failure of the session, or
    /// before the loop finishes step 2): the verification is the loop's again.
    func stop() {
        locked {
            cancelled = true
            pthread_cond_signal(wake)
        }
        if let thread { pthread_join(thread, nil) }
        thread = nil
    }

    private func run() {
        while true {
            let next: Int? = locked {
                while !cancelled && failure == nil && consumed >= stagedUpTo { pthread_cond_wait(wake, mutex) }
                return cancelled || failure != nil ? nil : consumed
            }
            guard let b = next, b < blockCount else { break }
            do throws(ReceiveFailure) {
                try feed(b)
                locked { consumed = b + 1 }
            } catch {
                locked { failure = error }
            }
        }
    }

    private func locked<T>(_ body: () -> T) -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return body()
    }
}
