import CZlib

/// Streaming zlib (RFC 1950) compression or decompression with bounded
/// buffers. Output is handed to `sink` piece by piece.
final class ZlibStream {
    enum Mode { case deflate(level: Int32), inflate }
    static let outputChunkByteCount = 256 * 1024

    private var stream = z_stream()
    private let mode: Mode
    private var output = [UInt8](repeating: 0, count: ZlibStream.outputChunkByteCount)
    private(set) var finished = false

    init(_ mode: Mode) throws(BundleError) {
        self.mode = mode
        let status: Int32 = switch mode {
        case .deflate(let level): fc_deflateInit(&stream, level)
        case .inflate: fc_inflateInit(&stream)
        }
        guard status == Z_OK else { throw BundleError(.invalidInput, "zlib init failed (\(status))") }
    }

    deinit {
        switch mode {
        case .deflate: deflateEnd(&stream)
        case .inflate: inflateEnd(&stream)
        }
    }

    /// Feeds `input`; with `finish`, flushes the end of the stream.
    func process(_ input: UnsafeRawBufferPointer, finish: Bool, sink: (UnsafeRawBufferPointer) throws(BundleError) -> Void) throws(BundleError) {
        stream.next_in = UnsafeMutablePointer(mutating: input.baseAddress?.assumingMemoryBound(to: Bytef.self))
        stream.avail_in = uInt(input.count)
        while true {
            let (status, produced): (Int32, Int) = output.withUnsafeMutableBytes { out in
                stream.next_out = out.baseAddress!.assumingMemoryBound(to: Bytef.self)
                stream.avail_out = uInt(out.count)
                let status: Int32 = switch mode {
                case .deflate: deflate(&stream, finish ? Z_FINISH : Z_NO_FLUSH)
                case .inflate: inflate(&stream, Z_NO_FLUSH)
                }
                return (status, out.count - Int(stream.avail_out))
            }
            if produced > 0 {
                let result = output.withUnsafeBytes { b in Result { () throws(BundleError) in try sink(UnsafeRawBufferPointer(rebasing: b[0..<produced])) } }
                try result.get()
            }
            switch status {
            case Z_STREAM_END:
                finished = true
                if case .inflate = mode, stream.avail_in > 0 {
                    throw BundleError(.decryptionFailed, "payload has \(stream.avail_in) bytes after the end of the zlib stream")
                }
                return
            case Z_OK:
                if stream.avail_in == 0 && stream.avail_out > 0 && !finish { return }
            case Z_BUF_ERROR:
                if stream.avail_in == 0 { return }  // needs more input
                throw BundleError(.decryptionFailed, "zlib made no progress")
            default:
                throw BundleError(.decryptionFailed, "payload does not decompress: zlib error \(status)")
            }
        }
    }
}
