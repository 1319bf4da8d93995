#define _GNU_SOURCE
#include "CLinuxIO.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <malloc.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

int clinuxio_set_noatime(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0 || fcntl(fd, F_SETFL, flags | O_NOATIME) != 0) return errno;
    return 0;
}

ssize_t clinuxio_pread_nowait(int fd, void *buf, size_t count, off_t offset) {
    struct iovec iov = { .iov_base = buf, .iov_len = count };
    return preadv2(fd, &iov, 1, offset, RWF_NOWAIT);
}

ssize_t clinuxio_pwrite_nowait(int fd, const void *buf, size_t count, off_t offset) {
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = count };
    return pwritev2(fd, &iov, 1, offset, RWF_NOWAIT);
}

int clinuxio_punch_hole(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int clinuxio_reserve(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length);
}

int clinuxio_zero_range(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
}

off_t clinuxio_seek_data(int fd, off_t offset) { return lseek(fd, offset, SEEK_DATA); }

off_t clinuxio_seek_hole(int fd, off_t offset) { return lseek(fd, offset, SEEK_HOLE); }

int clinuxio_block_device_size(int fd, uint64_t *size) {
    return ioctl(fd, BLKGETSIZE64, size);
}

int clinuxio_fadvise_willneed(int fd, off_t offset, off_t length) {
    return posix_fadvise(fd, offset, length, POSIX_FADV_WILLNEED);
}

int clinuxio_write_all(int fd, const void *bytes, size_t length) {
    const char *next = bytes;
    while (length > 0) {
        ssize_t n = write(fd, next, length);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) {
            errno = EIO;
            return -1;
        }
        next += n;
        length -= (size_t)n;
    }
    return 0;
}

int clinuxio_pwrite_all(int fd, const void *bytes, size_t length, off_t offset) {
    const char *next = bytes;
    while (length > 0) {
        ssize_t n = pwrite(fd, next, length, offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) {
            errno = ENOSPC;
            return -1;
        }
        next += n;
        offset += n;
        length -= (size_t)n;
    }
    return 0;
}

int clinuxio_pread_full(int fd, void *buffer, size_t length, off_t offset) {
    char *next = buffer;
    while (length > 0) {
        ssize_t n = pread(fd, next, length, offset);
        if (n < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (n == 0) {
            memset(next, 0, length);
            return 0;
        }
        next += n;
        offset += n;
        length -= (size_t)n;
    }
    return 0;
}

ssize_t clinuxio_copy_range(int fd_in, int fd_out, off_t offset, size_t length) {
    loff_t in = offset, out = offset;
    return copy_file_range(fd_in, &in, fd_out, &out, length, 0);
}

int clinuxio_start_writeback(int fd, uint64_t offset, uint64_t length) {
    if (length == 0) return 0;
    if (offset > (uint64_t)INT64_MAX || length > (uint64_t)INT64_MAX - offset) {
        errno = EINVAL;
        return -1;
    }
    return sync_file_range(fd, (off_t)offset, (off_t)length, SYNC_FILE_RANGE_WRITE);
}

int clinuxio_drop_written(int fd, off_t offset, off_t length) {
    unsigned int flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER;
    if (sync_file_range(fd, offset, length, flags) != 0) return -1;
    int error = posix_fadvise(fd, offset, length, POSIX_FADV_DONTNEED);
    if (error != 0) {
        errno = error;
        return -1;
    }
    return 0;
}

int clinuxio_is_block_device(int fd) {
    struct stat st;
    if (fstat(fd, &st) != 0) return 0;
    return S_ISBLK(st.st_mode) ? 1 : 0;
}

void clinuxio_release_free_memory(void) {
    malloc_trim(0);
}

void clinuxio_keep_large_allocations(size_t threshold) {
    mallopt(M_MMAP_THRESHOLD, (int)threshold);
    mallopt(M_TRIM_THRESHOLD, (int)(threshold * 2));
}

int clinuxio_loop_status(int fd, uint64_t *device, uint64_t *inode, uint64_t *offset, uint64_t *sizelimit) {
    struct loop_info64 info;
    memset(&info, 0, sizeof info);
    if (ioctl(fd, LOOP_GET_STATUS64, &info) != 0) return -1;
    *device = info.lo_device;
    *inode = info.lo_inode;
    *offset = info.lo_offset;
    *sizelimit = info.lo_sizelimit;
    return 0;
}

struct clinuxio_sleeper {
    pthread_mutex_t mutex;
    pthread_cond_t condition;
};

clinuxio_sleeper *clinuxio_sleeper_new(void) {
    clinuxio_sleeper *sleeper = malloc(sizeof *sleeper);
    if (sleeper == NULL) abort();
    pthread_mutex_init(&sleeper->mutex, NULL);
    pthread_cond_init(&sleeper->condition, NULL);
    return sleeper;
}

void clinuxio_sleeper_free(clinuxio_sleeper *sleeper) {
    pthread_cond_destroy(&sleeper->condition);
    pthread_mutex_destroy(&sleeper->mutex);
    free(sleeper);
}

void clinuxio_sleeper_lock(clinuxio_sleeper *sleeper) { pthread_mutex_lock(&sleeper->mutex); }

void clinuxio_sleeper_unlock(clinuxio_sleeper *sleeper) { pthread_mutex_unlock(&sleeper->mutex); }

void clinuxio_sleeper_wait(clinuxio_sleeper *sleeper) { pthread_cond_wait(&sleeper->condition, &sleeper->mutex); }

void clinuxio_sleeper_wake_all(clinuxio_sleeper *sleeper) {
    pthread_mutex_lock(&sleeper->mutex);
    pthread_cond_broadcast(&sleeper->condition);
    pthread_mutex_unlock(&sleeper->mutex);
}
