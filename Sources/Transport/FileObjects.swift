import DeliveryCore
import BundleFormat
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
        let rc = out.withUnsafeMutableBytes { preadFully(fd, $0, at: base + range.lowerBound) }
        if rc != 0 && failure == nil { failure = .system(.storage, "read \(path)", rc) }
        return out
    }
}

/// pread until `buffer` is full. Returns 0, or -errno (-EIO at end of file).
func preadFully(_ fd: Int32, _ buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Int32 {
    var done = 0
    while done < buffer.count {
        let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
        if n < 0 && errno == EINTR { continue }
        guard n > 0 else { return n < 0 ? -errno : -EIO }
        done += n
    }
    return 0
}
