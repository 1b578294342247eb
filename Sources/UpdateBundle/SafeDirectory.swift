import CFileIO
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A directory held open, whose files are reached only by name under its
/// descriptor (`openat` and friends) and never through a symbolic link: an
/// attacker who can plant a link where a file of ours will be cannot make us
/// write elsewhere. Temporaries are created exclusively (`O_EXCL`), a stale one
/// being removed first, so nothing is clobbered through a name chosen in advance.
///
/// A directory that holds verified bytes before they are released (staging,
/// output) may be refused when another user could change it under us:
/// `requirePrivate` checks that it belongs to us (or root) and that neither
/// group nor others may write it.
public final class SafeDirectory {
    public let path: String
    let fd: Int32

    /// Opens `path` (creating it with `createMode` if asked and missing).
    public init(path: String, create createMode: mode_t? = nil, requirePrivate: Bool = false) throws(BundleError) {
        self.path = path
        if let createMode, mkdir(path, createMode) != 0, errno != EEXIST { throw .io("create directory \(path)") }
        let d = Glibc.open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard d >= 0 else { throw .io("open directory \(path)") }
        // Checked before `fd` is set: a throwing init with every property set runs deinit.
        if requirePrivate {
            var st = stat()
            guard fstat(d, &st) == 0 else { close(d); throw .io("stat \(path)") }
            if st.st_uid != geteuid() && st.st_uid != 0 {
                close(d)
                throw BundleError(.io, "\(path) belongs to user \(st.st_uid), not to this user (\(geteuid())): refusing to keep verified bytes there")
            }
            if st.st_mode & (S_IWGRP | S_IWOTH) != 0 {
                close(d)
                throw BundleError(.io, "\(path) may be written by other users (mode \(String(st.st_mode & 0o7777, radix: 8))): refusing to keep verified bytes there; chmod go-w it")
            }
        }
        fd = d
    }

    deinit { close(fd) }

    public func file(_ name: String) -> String { path + "/" + name }

    private static func check(_ name: String) {
        precondition(!name.isEmpty && !name.contains("/") && name != "." && name != "..", "a name inside the directory, not a path")
    }

    /// Opens an existing regular file for reading (and writing), never through a link;
    /// a FIFO or device planted there is refused without blocking on it.
    public func open(_ name: String, writable: Bool = false) throws(BundleError) -> File {
        Self.check(name)
        let f = openat(fd, name, (writable ? O_RDWR : O_RDONLY) | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC)
        guard f >= 0 else { throw .io("open \(file(name))") }
        var st = stat()
        guard fstat(f, &st) == 0, st.st_mode & S_IFMT == S_IFREG else {
            close(f)
            throw BundleError(.io, "\(file(name)) is not a regular file")
        }
        return File(adopting: f, path: file(name))
    }

    /// Bytes `name` occupies on disk (0 if missing or not a regular file): what
    /// replacing it gives back.
    public func allocatedBytes(_ name: String) -> UInt64 {
        Self.check(name)
        var st = stat()
        guard fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0, st.st_mode & S_IFMT == S_IFREG else { return 0 }
        return UInt64(st.st_blocks) * 512
    }

    /// The (device, inode) of the directory itself.
    public var directoryIdentity: (UInt64, UInt64)? {
        var st = stat()
        guard fstat(fd, &st) == 0 else { return nil }
        return (UInt64(st.st_dev), UInt64(st.st_ino))
    }

    /// The (device, inode) of `name`, not following a link.
    public func identity(_ name: String) -> (UInt64, UInt64)? {
        Self.check(name)
        var st = stat()
        guard fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 else { return nil }
        return (UInt64(st.st_dev), UInt64(st.st_ino))
    }

    /// Whether `name` exists as anything, a link included.
    public func exists(_ name: String) -> Bool {
        Self.check(name)
        var st = stat()
        return fstatat(fd, name, &st, AT_SYMLINK_NOFOLLOW) == 0
    }

    /// Creates `name` afresh and exclusively: whatever was there (a stale temporary,
    /// a link) is removed first, then the file is made with `O_EXCL`.
    public func createExclusive(_ name: String, mode: mode_t = 0o600, readable: Bool = false) throws(BundleError) -> File {
        Self.check(name)
        if unlinkat(fd, name, 0) != 0 && errno != ENOENT { throw .io("remove \(file(name))") }
        let f = openat(fd, name, (readable ? O_RDWR : O_WRONLY) | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)
        guard f >= 0 else { throw .io("create \(file(name))") }
        fchmod(f, mode)  // the umask narrowed O_CREAT's mode; the caller's is meant
        return File(adopting: f, path: file(name))
    }

    /// A read-write scratch file that no name reaches: created exclusively, then unlinked.
    public func scratch(_ prefix: String) throws(BundleError) -> File {
        for attempt in 0..<100 {
            let name = ".\(prefix)-\(getpid())-\(attempt)"
            let f = openat(fd, name, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o600)
            if f < 0 { if errno == EEXIST { continue }; throw .io("create a scratch file in \(path)") }
            unlinkat(fd, name, 0)
            return File(adopting: f, path: file(name))
        }
        throw BundleError(.io, "no free scratch name in \(path)")
    }

    /// Renames within the directory, then makes the rename durable (fsync of the
    /// directory). A link at `to` is replaced, never followed; with `replacing: false`
    /// anything at `to` makes it fail instead (`RENAME_NOREPLACE`: no check-then-act).
    public func rename(_ from: String, to: String, replacing: Bool = true) throws(BundleError) {
        Self.check(from)
        Self.check(to)
        let rc = replacing ? (renameat(fd, from, fd, to) == 0 ? 0 : -errno) : fc_rename_noreplace(fd, from, fd, to)
        guard rc == 0 else {
            errno = -rc
            if errno == EEXIST { throw BundleError(.invalidInput, "\(file(to)) exists") }
            throw .io("rename \(file(from)) to \(file(to))")
        }
        try sync()
    }

    /// Removes a file (a link itself, not what it points to); a missing one is fine.
    public func remove(_ name: String) {
        Self.check(name)
        unlinkat(fd, name, 0)
    }

    /// fsync of the directory: renames and removals in it become durable.
    public func sync() throws(BundleError) {
        guard fsync(fd) == 0 else { throw .io("fsync directory \(path)") }
    }

    /// Writes a whole file atomically: a temporary beside it (`temporary`, default
    /// `<name>.tmp`), fsync, rename, fsync of the directory. A crash leaves the old
    /// file or the new one, never a part; a failure leaves no temporary.
    public func writeAtomically(_ bytes: [UInt8], to name: String, mode: mode_t = 0o600, temporary: String? = nil,
                                replacing: Bool = true) throws(BundleError) {
        let temporary = temporary ?? name + ".tmp"
        do {
            let f = try createExclusive(temporary, mode: mode)
            try f.write(bytes)
            try f.sync()
            try rename(temporary, to: name, replacing: replacing)
        } catch {
            remove(temporary)
            throw error
        }
    }

    /// Reads a whole small file, or nil when it is missing, a link, or larger than `limit`.
    public func readWhole(_ name: String, limit: Int) -> [UInt8]? {
        guard let f = try? open(name), let size = try? f.size, size <= UInt64(limit) else { return nil }
        return try? f.read(at: 0, count: Int(size))
    }
}
