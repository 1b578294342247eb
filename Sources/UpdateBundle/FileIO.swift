#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A file descriptor with the few operations pack and verify need. Errors
/// carry the path and errno's text; short reads at end of file are normal.
final class File {
    let path: String
    let fd: Int32

    private init(path: String, fd: Int32) { self.path = path; self.fd = fd }

    static func open(reading path: String) throws(BundleError) -> File {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw .io("open \(path)") }
        return File(path: path, fd: fd)
    }

    /// Creates (or truncates) a file with the given mode.
    static func create(_ path: String, mode: mode_t = 0o644) throws(BundleError) -> File {
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else { throw .io("create \(path)") }
        return File(path: path, fd: fd)
    }

    /// A read-write scratch file, unlinked at once so nothing is left behind.
    static func scratch(near path: String) throws(BundleError) -> File {
        let directory = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        var template = Array(((directory.isEmpty ? "." : directory) + "/.fleetcast-scratch-XXXXXX").utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw .io("scratch file in \(directory.isEmpty ? "." : directory)") }
        let name = String(cString: template)
        unlink(name)
        return File(path: name, fd: fd)
    }

    deinit { close(fd) }

    var size: UInt64 {
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
    func read(at offset: UInt64, count: Int) throws(BundleError) -> [UInt8] {
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

    func write(_ bytes: UnsafeRawBufferPointer) throws(BundleError) {
        var done = 0
        while done < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
            if n < 0 { if errno == EINTR { continue }; throw .io("write \(path)") }
            done += n
        }
    }

    func write(_ bytes: [UInt8]) throws(BundleError) {
        let result = bytes.withUnsafeBytes { b in Result { () throws(BundleError) in try write(b) } }
        try result.get()
    }

    func seek(to offset: UInt64) throws(BundleError) {
        guard lseek(fd, off_t(offset), SEEK_SET) >= 0 else { throw .io("seek \(path)") }
    }

    func sync() throws(BundleError) {
        guard fsync(fd) == 0 else { throw .io("fsync \(path)") }
    }
}

extension BundleError {
    static func io(_ what: String) -> BundleError {
        BundleError(.io, "\(what): \(String(cString: strerror(errno)))")
    }
}

/// Renames atomically and syncs the directory, so a crash leaves either no
/// file or the whole file.
func commitFile(from temporary: String, to final: String) throws(BundleError) {
    guard rename(temporary, final) == 0 else { throw .io("rename \(temporary) to \(final)") }
    let directory = final.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
    let fd = Glibc.open(directory.isEmpty ? "." : directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
    if fd >= 0 { fsync(fd); close(fd) }
}
