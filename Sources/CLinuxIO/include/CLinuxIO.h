#ifndef CLINUXIO_H
#define CLINUXIO_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// Reads from the page cache only: returns the byte count, or -1 with errno EAGAIN when
/// the data would need disk I/O (preadv2 with RWF_NOWAIT).
ssize_t clinuxio_pread_nowait(int fd, void *buf, size_t count, off_t offset);

/// pwritev2 with RWF_NOWAIT: -1/EAGAIN when the write would block.
ssize_t clinuxio_pwrite_nowait(int fd, const void *buf, size_t count, off_t offset);

/// Adds O_NOATIME to an open descriptor's status flags (fcntl F_SETFL), so reads do
/// not update the file's access time. Returns 0 or an errno value (EPERM when the
/// caller neither owns the file nor has CAP_FOWNER).
int clinuxio_set_noatime(int fd);

/// fallocate(PUNCH_HOLE|KEEP_SIZE).
int clinuxio_punch_hole(int fd, off_t offset, off_t length);

/// fallocate(KEEP_SIZE): allocates blocks for [offset, offset+length) without changing
/// the file size, so later writes there never need new blocks (a journal that can be
/// appended to on a full disk). Returns 0 or -1 with errno set.
int clinuxio_reserve(int fd, off_t offset, off_t length);

/// fallocate(ZERO_RANGE|KEEP_SIZE).
int clinuxio_zero_range(int fd, off_t offset, off_t length);

/// lseek(SEEK_DATA) and lseek(SEEK_HOLE).
off_t clinuxio_seek_data(int fd, off_t offset);
off_t clinuxio_seek_hole(int fd, off_t offset);

/// Size of a block device (BLKGETSIZE64); -1 with errno on failure.
int clinuxio_block_device_size(int fd, uint64_t *size);

/// posix_fadvise(WILLNEED); returns 0 or an errno value.
int clinuxio_fadvise_willneed(int fd, off_t offset, off_t length);

/// write(2) until all `length` bytes are written, retrying on EINTR; returns 0, or -1
/// with errno set (a write that makes no progress reports EIO).
int clinuxio_write_all(int fd, const void *bytes, size_t length);

/// pwrite(2) until all `length` bytes are written at `offset`, retrying on EINTR; returns
/// 0, or -1 with errno set (a write that makes no progress reports ENOSPC).
int clinuxio_pwrite_all(int fd, const void *bytes, size_t length, off_t offset);

/// pread(2) until `length` bytes are read from `offset`, retrying on EINTR; bytes past
/// the end of the file read as zeroes. Returns 0, or -1 with errno set.
int clinuxio_pread_full(int fd, void *buffer, size_t length, off_t offset);

/// copy_file_range between two files at the same offset, in the kernel; returns bytes
/// copied (may be short; 0 at end of file) or -1 with errno set.
ssize_t clinuxio_copy_range(int fd_in, int fd_out, off_t offset, size_t length);

/// sync_file_range(SYNC_FILE_RANGE_WRITE): starts writeback of a range without waiting;
/// returns 0 or -1 with errno set. An empty range is a no-op (sync_file_range would take
/// length 0 as "to the end of the file"); a range beyond off_t fails with EINVAL.
int clinuxio_start_writeback(int fd, uint64_t offset, uint64_t length);

/// Waits until a range written earlier is on the disk (sync_file_range with WAIT_BEFORE,
/// WRITE and WAIT_AFTER), then drops its pages from the page cache
/// (posix_fadvise DONTNEED). Returns 0 or -1 with errno set.
int clinuxio_drop_written(int fd, off_t offset, off_t length);

/// True when the fd refers to a block device.
int clinuxio_is_block_device(int fd);

/// Gives the heap's free memory back to the system (malloc_trim(0)): after buffers kept
/// on the heap by clinuxio_keep_large_allocations were freed for good.
void clinuxio_release_free_memory(void);

/// Serves allocations up to `threshold` bytes from the heap instead of fresh mmaps, and
/// keeps freed heap memory for reuse: large read replies then cost no page faults.
void clinuxio_keep_large_allocations(size_t threshold);

/// What a loop device is attached to (LOOP_GET_STATUS64): the backing file's device
/// number (encoded as the kernel's huge_encode_dev, decodable like a dev_t) and inode, the
/// offset into it and the size limit (0: none). Returns 0, or -1 with errno set (ENXIO
/// when the loop device is not attached, ENOTTY when `fd` is not a loop device).
int clinuxio_loop_status(int fd, uint64_t *device, uint64_t *inode, uint64_t *offset, uint64_t *sizelimit);

/// A mutex and a condition variable in one allocation, for a thread that must sleep
/// until another thread changes some state (never an event loop thread): the sleeper
/// locks, checks the state, and waits while it is not what it needs; the changer calls
/// `clinuxio_sleeper_wake_all` after changing the state. `new` aborts only if the
/// process cannot allocate a few dozen bytes.
typedef struct clinuxio_sleeper clinuxio_sleeper;
clinuxio_sleeper *_Nonnull clinuxio_sleeper_new(void);
void clinuxio_sleeper_free(clinuxio_sleeper *_Nonnull sleeper);
void clinuxio_sleeper_lock(clinuxio_sleeper *_Nonnull sleeper);
void clinuxio_sleeper_unlock(clinuxio_sleeper *_Nonnull sleeper);
/// Releases the lock while asleep and holds it again on return (spurious wake-ups
/// happen: check the state again).
void clinuxio_sleeper_wait(clinuxio_sleeper *_Nonnull sleeper);
/// Locks, wakes every sleeper, unlocks.
void clinuxio_sleeper_wake_all(clinuxio_sleeper *_Nonnull sleeper);

#endif
