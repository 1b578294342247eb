import CFileIO
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A file descriptor with the few operations pack, verify and staging need.
/// Errors carry the path and errno's text; short reads at end of file are normal.
/// Files are made by `SafeDirectory` (never through a link, temporaries
/// exclusively) or opened for reading by path.
public final class File {
    public let path: String
    public let fd: Int32

    /// Takes ownership of an open descriptor.
    init(adopting fd: Int32, path: String) { self.path = path; self.fd = fd }

    public static func open(reading path: String) throws(BundleError) -> File {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io("open \(path)") }
        return File(adopting: fd, path: path)
    }

    /// An existing file or block device opened for reading and writing in place (a
    /// device agent's slot): never created, never truncated.
    public static func open(updating path: String) throws(BundleError) -> File {
        let fd = Glibc.open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { throw .io("open \(path) for writing") }
        return File(adopting: fd, path: path)
    }

    deinit { close(fd) }

    /// What the descriptor is: a regular file or a block device, and the bytes it
    /// holds (a block device's size comes from seeking to its end).
    public func extent() throws(BundleError) -> (isBlockDevice: Bool, size: UInt64) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .io("stat \(path)") }
        switch st.st_mode & S_IFMT {
        case S_IFREG: return (false, UInt64(st.st_size))
        case S_IFBLK:
            let end = lseek(fd, 0, SEEK_END)
            guard end >= 0 else { throw .io("seek to the end of \(path)") }
            return (true, UInt64(end))
        default: throw BundleError(.invalidInput, "\(path) is neither a regular file nor a block device")
        }
    }

    /// Drops the file's clean cached pages (posix_fadvise DONTNEED), so that the next
    /// read comes from the device, not from memory: a read-back then checks what the
    /// device holds. Best effort.
    public func dropCachedPages() { _ = posix_fadvise(fd, 0, 0, Int32(POSIX_FADV_DONTNEED)) }

    /// Starts writeback of `[offset, offset + length)` without waiting (best effort:
    /// the fsync that follows is what counts).
    public func startWriteback(offset: UInt64, length: UInt64) {
        _ = fc_start_writeback(fd, Int64(offset), Int64(length))
    }

    /// Frees the disk space of `[offset, offset + length)`, keeping the file's size;
    /// the range then reads as zeros. False where the file system cannot (the
    /// bytes then stay; a caller that counts on the room must check).
    @discardableResult
    public func releaseSpace(offset: UInt64, length: UInt64) -> Bool {
        length == 0 || fc_punch_hole(fd, Int64(offset), Int64(length)) == 0
    }

    public var size: UInt64 {
        get throws(BundleError) {
            var st = stat()
            guard fstat(fd, &st) == 0 else { throw .io("stat \(path)") }
            return UInt64(st.st_size)
        }
    }

    /// Reads up to `count` bytes (fewer only at end of file).
    func read(into buffer: inout [UInt8], count: Int) throws(BundleError) -> Int {
        if buffer.count < count { buffer = [UInt8](repeating: 0, count: count) }
        var total = 0
        while total < count {
            let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + total, count - total) }
            if n < 0 { if errno == EINTR { continue }; throw .io("read \(path)") }
            if n == 0 { break }
            total += n
        }
        return total
    }

    /// Reads exactly `count` bytes at `offset`.
    public func read(at offset: UInt64, count: Int) throws(BundleError) -> [UInt8] {
        var buffer = [UInt8](repeating: 0, count: count)
        var total = 0
        while total < count {
            let n = buffer.withUnsafeMutableBytes { pread(fd, $0.baseAddress! + total, count - total, off_t(offset) + off_t(total)) }
            if n < 0 { if errno == EINTR { continue }; throw .io("read \(path)") }
            if n == 0 { throw BundleError(.sizeMismatch, "\(path): ends at \(offset + UInt64(total)), expected \(count) bytes at \(offset)") }
            total += n
        }
        return buffer
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws(BundleError) {
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 { if errno == EINTR { continue }; throw .io("write \(path)") }
            done += n
        }
    }

    public func write(_ bytes: [UInt8]) throws(BundleError) {
        let result = bytes.withUnsafeBytes { b in Result { () throws(BundleError) in try write(b) } }
        try result.get()
    }

    func seek(to offset: UInt64) throws(BundleError) {
        guard lseek(fd, off_t(offset), SEEK_SET) >= 0 else { throw .io("seek \(path)") }
    }

    public func sync() throws(BundleError) {
        guard fsync(fd) == 0 else { throw .io("fsync \(path)") }
    }

    /// fdatasync: the data and the size, not every attribute.
    public func syncData() throws(BundleError) {
        guard fdatasync(fd) == 0 else { throw .io("fdatasync \(path)") }
    }

    /// Writes all of `bytes` at `offset`.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(BundleError) {
        var done = 0
        while done < bytes.count {
            let n = pwrite(fd, bytes.baseAddress! + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 { if errno == EINTR { continue }; throw .io("write \(path)") }
            guard n > 0 else { throw BundleError(.io, "write \(path): no progress") }
            done += n
        }
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws(BundleError) {
        try bytes.withUnsafeBytes { b in Result { () throws(BundleError) in try write(b, at: offset) } }.get()
    }

    /// Reads exactly `buffer.count` bytes at `offset` into `buffer`.
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(BundleError) {
        var total = 0
        while total < buffer.count {
            let n = pread(fd, buffer.baseAddress! + total, buffer.count - total, off_t(offset) + off_t(total))
            if n < 0 { if errno == EINTR { continue }; throw .io("read \(path)") }
            if n == 0 { throw BundleError(.sizeMismatch, "\(path): ends at \(offset + UInt64(total)), expected \(buffer.count) bytes at \(offset)") }
            total += n
        }
    }

    /// Reserves `[offset, offset + length)` on disk (posix_fallocate). False when the
    /// file system cannot reserve (a sparse file then does); throws when there is no room.
    public func reserve(offset: UInt64, length: UInt64, what: String) throws(BundleError) -> Bool {
        guard length > 0 else { return true }
        let rc = posix_fallocate(fd, off_t(offset), off_t(length))
        if rc == ENOSPC || rc == EFBIG { throw BundleError(.io, "no room \(what): \(String(cString: strerror(rc)))") }
        return rc == 0
    }

    public func truncate(to size: UInt64) throws(BundleError) {
        guard ftruncate(fd, off_t(size)) == 0 else { throw .io("set the size of \(path)") }
    }
}

extension BundleError {
    static func io(_ what: String) -> BundleError {
        BundleError(.io, "\(what): \(String(cString: strerror(errno)))")
    }
}
