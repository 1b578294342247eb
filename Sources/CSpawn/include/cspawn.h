// Process calls that Glibc's Swift module does not export (they need _GNU_SOURCE or
// glibc 2.29+/2.34+ extensions).
#pragma once
#include <spawn.h>

/// pipe2 with O_CLOEXEC on both ends. 0, or -errno.
int fc_pipe_cloexec(int fds[2]);

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34): the child closes every
/// descriptor from `from` up. 0, or an error number.
int fc_spawn_add_closefrom(posix_spawn_file_actions_t *actions, int from);

/// posix_spawn_file_actions_addchdir_np (glibc 2.29). 0, or an error number.
int fc_spawn_add_chdir(posix_spawn_file_actions_t *actions, const char *path);
