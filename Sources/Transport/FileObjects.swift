import DeliveryCore
import UpdateBundle
import WireFormat
#if canImport(Glibc)
import Glibc
#endif

/// The sender's two objects read straight from a bundle file with pread, so
/// the sender's memory does not grow with the bundle (Specs/bundle.md §3
/// gives the offsets). The sender core caches what it encodes.
public final class FileObjects: ObjectSource {
    public let path: String
    public let header: BundleHeader
    private let fd: Int32
    /// The first read error; the driver checks it after every wake and stops.
    public private(set) var failure: TransportError?

    public init(bundlePath: String, header: BundleHeader) throws(TransportError) {
        path = bundlePath
        self.header = header
        fd = open(bundlePath, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .system(.storage, "open \(bundlePath)", -errno) }
    }

    deinit { close(fd) }

    public func read(object: ObjectID, range: Range<UInt64>) -> [UInt8] {
        let base = object == .payload ? header.payloadOffset : header.authOffset
        let limit = object == .payload ? header.payloadLength : header.authLength
        precondition(range.upperBound <= limit, "read past the end of \(object)")
        var out = [UInt8](repeating: 0, count: range.count)
        var done = 0
        while done < out.count {
            let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + done, $0.count - done, off_t(base + range.lowerBound) + off_t(done)) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 {
                if failure == nil { failure = .system(.storage, "read \(path)", n < 0 ? -errno : -EIO) }
                break
            }
            done += n
        }
        return out
    }
}
