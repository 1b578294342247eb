#define _GNU_SOURCE
#include "cfileio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>

int fc_start_writeback(int fd, int64_t offset, int64_t length) {
    return sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE) == 0 ? 0 : -errno;
}

int fc_rename_noreplace(int fromdir, const char *from, int todir, const char *to) {
    return renameat2(fromdir, from, todir, to, RENAME_NOREPLACE) == 0 ? 0 : -errno;
}

int fc_punch_hole(int fd, int64_t offset, int64_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)offset, (off_t)length) == 0 ? 0 : -errno;
}
