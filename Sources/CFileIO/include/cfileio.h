// File-system calls that Glibc's Swift module does not export (they need _GNU_SOURCE).
#pragma once
#include <stdint.h>

/// Starts writeback of [offset, offset + length) of `fd` without waiting for it
/// (sync_file_range with SYNC_FILE_RANGE_WRITE). 0, or -errno.
int fc_start_writeback(int fd, int64_t offset, int64_t length);

/// renameat2 with RENAME_NOREPLACE: fails with EEXIST instead of replacing `to`.
/// 0, or -errno.
int fc_rename_noreplace(int fromdir, const char *from, int todir, const char *to);

/// Frees the disk blocks of [offset, offset + length) of `fd`, keeping its size
/// (fallocate with FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE); the range reads
/// as zeros afterwards. 0, or -errno (EOPNOTSUPP where the file system cannot).
int fc_punch_hole(int fd, int64_t offset, int64_t length);
