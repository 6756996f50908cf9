/*
 * virtio-vhost-user device: tunnels a vhost-user connection into the guest.
 *
 * Front-end -> device: messages are read from the chardev, file descriptors
 * are turned into device resources (memory regions into the shared-memory
 * BAR, call/err eventfds into doorbell ioeventfds, kick eventfds into MSI-X
 * vectors), and the message is put into one rxq buffer.
 * Guest -> front-end: replies are taken from txq and written to the socket;
 * backend requests (txq messages without the REPLY flag) go to the backend
 * channel the front-end handed over, and its replies come back on rxq.
 *
 * Nothing a front-end or the guest sends can stop QEMU: protocol errors by
 * the front-end disconnect it; errors by the guest driver set
 * DEVICE_NEEDS_RESET through virtio_error().
 *
 * The ABI is specified in design/VVU-SPEC.md of the vhost-appliance project.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include <linux/fs.h>
#include <sys/ioctl.h>
#include "qapi/error.h"
#include "qemu/error-report.h"
#include "qemu/iov.h"
#include "qemu/log.h"
#include "qemu/main-loop.h"
#include "qemu/memfd.h"
#include "qemu/mmap-alloc.h"
#include "qemu/module.h"
#include "qemu/rcu.h"
#include "qemu/sockets.h"
#include "qemu/units.h"
#include "hw/qdev-properties.h"
#include "hw/qdev-properties-system.h"
#include "hw/virtio/virtio.h"
#include "hw/virtio/virtio-vhost-user.h"
#include "migration/vmstate.h"
#include "chardev/char-socket.h"
#include "trace.h"
#include "exec/memory.h"

/* vhost-user requests (docs/interop/vhost-user.rst). */
enum {
    VU_GET_FEATURES = 1,
    VU_SET_FEATURES = 2,
    VU_SET_OWNER = 3,
    VU_RESET_OWNER = 4,
    VU_SET_MEM_TABLE = 5,
    VU_SET_VRING_NUM = 8,
    VU_SET_VRING_ADDR = 9,
    VU_SET_VRING_BASE = 10,
    VU_GET_VRING_BASE = 11,
    VU_SET_VRING_KICK = 12,
    VU_SET_VRING_CALL = 13,
    VU_SET_VRING_ERR = 14,
    VU_GET_PROTOCOL_FEATURES = 15,
    VU_SET_PROTOCOL_FEATURES = 16,
    VU_GET_QUEUE_NUM = 17,
    VU_SET_VRING_ENABLE = 18,
    VU_SET_BACKEND_REQ_FD = 21,
    VU_GET_CONFIG = 24,
    VU_SET_CONFIG = 25,
    VU_GET_INFLIGHT_FD = 31,
    VU_SET_INFLIGHT_FD = 32,
    VU_RESET_DEVICE = 34,
    VU_GET_MAX_MEM_SLOTS = 36,
    VU_ADD_MEM_REG = 37,
    VU_REM_MEM_REG = 38,
    VU_SET_STATUS = 39,
    VU_GET_STATUS = 40,
};

#define VU_HDR_SIZE          12
#define VU_FLAG_VERSION_MASK 0x3u
#define VU_VERSION           0x1u
#define VU_FLAG_REPLY        (1u << 2)
#define VU_FLAG_NEED_REPLY   (1u << 3)
#define VU_VRING_IDX_MASK    0xffull
#define VU_VRING_NOFD        (1ull << 8)
#define VU_REGION_SIZE       32          /* gpa, size, uaddr, mmap_offset */
#define VU_MEM_TABLE_MAX     8
#define VHOST_F_LOG_ALL      26
/* VhostUserInflight: mmap_size, mmap_offset, num_queues, queue_size (+ pad). */
#define VU_INFLIGHT_MIN      20
/* Largest inflight area the device creates for a back-end (GET_INFLIGHT_FD). */
#define VVU_INFLIGHT_MAX     (64 * MiB)

/* Protocol features the device can carry (a mask of 1 << bit). */
#define VVU_PROTOCOL_FEATURES                           \
    ((1ull << 0)  /* MQ */ |                            \
     (1ull << 3)  /* REPLY_ACK */ |                     \
     (1ull << 5)  /* BACKEND_REQ */ |                   \
     (1ull << 9)  /* CONFIG */ |                        \
     (1ull << 12) /* INFLIGHT_SHMFD */ |                \
     (1ull << 13) /* RESET_DEVICE */ |                  \
     (1ull << 15) /* CONFIGURE_MEM_SLOTS */ |           \
     (1ull << 16) /* STATUS */)

typedef enum {
    VVU_FORWARD,        /* put it on rxq (possibly rewritten) */
    VVU_REFUSE,         /* error reply if one is expected, else disconnect */
    VVU_PROTOCOL_ERROR, /* disconnect */
} VVUAction;

static void vvu_disconnect(VirtIOVhostUser *s, bool close_socket);

static uint32_t vvu_le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return le32_to_cpu(v);
}

static uint64_t vvu_le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return le64_to_cpu(v);
}

static void vvu_put_le64(uint8_t *p, uint64_t v)
{
    v = cpu_to_le64(v);
    memcpy(p, &v, sizeof(v));
}

static uint32_t vvu_msg_request(const uint8_t *msg) { return vvu_le32(msg); }
static uint32_t vvu_msg_flags(const uint8_t *msg) { return vvu_le32(msg + 4); }
static uint32_t vvu_msg_size(const uint8_t *msg) { return vvu_le32(msg + 8); }

/* ---- memory regions in the shared-memory BAR ---------------------------- */

static bool vvu_overlaps(const VirtIOVhostUserRegion *r, uint64_t off,
                         uint64_t size)
{
    return r->mr && off < r->bar_offset + r->map_len &&
           r->bar_offset < off + size;
}

static bool vvu_range_free(VirtIOVhostUser *s, uint64_t off, uint64_t size)
{
    for (int i = 0; i < VIRTIO_VHOST_USER_MAX_REGIONS; i++) {
        if (vvu_overlaps(&s->regions[i], off, size)) {
            return false;
        }
    }
    if (vvu_overlaps(&s->inflight, off, size)) {
        return false;
    }
    return off + size <= s->shm_size && off + size > off;
}

/* The first 2 MiB-aligned BAR offset after r, if r is mapped. */
static bool vvu_try_after(VirtIOVhostUser *s, const VirtIOVhostUserRegion *r,
                          uint64_t size, uint64_t *out)
{
    uint64_t cand;

    if (!r->mr) {
        return false;
    }
    cand = ROUND_UP(r->bar_offset + r->map_len, VIRTIO_VHOST_USER_REGION_ALIGN);
    if (vvu_range_free(s, cand, size)) {
        *out = cand;
        return true;
    }
    return false;
}

/*
 * First fit at REGION_ALIGN: candidates are 0 and the end of every region and
 * of the inflight area.
 */
static bool vvu_find_bar_offset(VirtIOVhostUser *s, uint64_t size,
                                uint64_t *out)
{
    if (vvu_range_free(s, 0, size)) {
        *out = 0;
        return true;
    }
    for (int i = 0; i < VIRTIO_VHOST_USER_MAX_REGIONS; i++) {
        if (vvu_try_after(s, &s->regions[i], size, out)) {
            return true;
        }
    }
    return vvu_try_after(s, &s->inflight, size, out);
}

/*
 * A frontend region's mapping in this process. The device maps the region
 * itself instead of using memory_region_init_ram_from_fd(), which insists
 * that the file covers the whole region: a vhost-user frontend may pass a
 * file shorter than the region (libblkio's ring memfd is), and a backend
 * maps it regardless. Whole pages of the file are shared; pages wholly past
 * its end are private zero pages, so a guest store there is neither a SIGBUS
 * nor visible to the frontend (which cannot have data there either).
 */
typedef struct VVUMapping {
    struct rcu_head rcu;
    void *addr;
    size_t len;
} VVUMapping;

static void vvu_mapping_free(VVUMapping *m)
{
    munmap(m->addr, m->len);
    g_free(m);
}

/* Property release of the region's owner: runs when the owner is finalized. */
static void vvu_mapping_release(Object *obj, const char *name, void *opaque)
{
    VVUMapping *m = opaque;

    /* A vCPU may still be inside an RCU read section that saw the region. */
    call_rcu(m, vvu_mapping_free, rcu);
}

/*
 * Bytes of fd from mmap_offset on, rounded up to the fd's page size and
 * capped at len; len itself when the size of fd is not known (char devices).
 */
static uint64_t vvu_fd_backed_len(int fd, uint64_t mmap_offset, uint64_t len,
                                  uint64_t page, Error **errp)
{
    struct stat st;
    int64_t file_size;

    if (fstat(fd, &st) < 0) {
        error_setg_errno(errp, errno, "fstat of the region's file");
        return 0;
    }
    if (S_ISREG(st.st_mode)) {
        file_size = st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        uint64_t bytes;

        /* Not lseek(): the file offset is shared with the front-end. */
        if (ioctl(fd, BLKGETSIZE64, &bytes) < 0) {
            error_setg_errno(errp, errno, "size of the region's block device");
            return 0;
        }
        file_size = bytes;
    } else {
        return len;
    }
    if ((uint64_t)file_size <= mmap_offset) {
        error_setg(errp, "region file of 0x%" PRIx64 " bytes ends at or "
                   "before its mmap_offset 0x%" PRIx64,
                   (uint64_t)file_size, mmap_offset);
        return 0;
    }
    return MIN(ROUND_UP((uint64_t)file_size - mmap_offset, page), len);
}

/*
 * Maps fd[mmap_offset, +len) at a page-aligned address: the part the file
 * covers shared, the rest private and zero. Returns NULL with errp set.
 */
static VVUMapping *vvu_map_region(int fd, uint64_t mmap_offset, uint64_t size,
                                  Error **errp)
{
    uint64_t page = qemu_fd_getpagesize(fd);
    uint64_t len = ROUND_UP(size, page);
    uint64_t backed;
    uint8_t *reserved, *base;
    VVUMapping *m;

    if (mmap_offset & (page - 1)) {
        error_setg(errp, "region mmap_offset 0x%" PRIx64 " is not aligned to "
                   "its file's page size 0x%" PRIx64, mmap_offset, page);
        return NULL;
    }
    if (len < size || mmap_offset + len < mmap_offset) {
        error_setg(errp, "region of 0x%" PRIx64 " bytes at mmap_offset 0x%"
                   PRIx64 " overflows", size, mmap_offset);
        return NULL;
    }
    backed = vvu_fd_backed_len(fd, mmap_offset, len, page, errp);
    if (!backed) {
        return NULL;
    }
    /* Reserve len + page so base can be aligned to the fd's page size. */
    reserved = mmap(NULL, len + page, PROT_NONE,
                    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (reserved == MAP_FAILED) {
        error_setg_errno(errp, errno, "reserving 0x%" PRIx64 " bytes", len);
        return NULL;
    }
    base = QEMU_ALIGN_PTR_UP(reserved, page);
    if (base > reserved) {
        munmap(reserved, base - reserved);
    }
    munmap(base + len, reserved + len + page - (base + len));
    if (mmap(base, backed, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED,
             fd, mmap_offset) == MAP_FAILED) {
        error_setg_errno(errp, errno, "mapping 0x%" PRIx64 " bytes of the "
                         "region's file at offset 0x%" PRIx64,
                         backed, mmap_offset);
        munmap(base, len);
        return NULL;
    }
    if (backed < len &&
        mmap(base + backed, len - backed, PROT_READ | PROT_WRITE,
             MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE,
             -1, 0) == MAP_FAILED) {
        error_setg_errno(errp, errno, "mapping the region's tail");
        munmap(base, len);
        return NULL;
    }
    m = g_new0(VVUMapping, 1);
    m->addr = base;
    m->len = len;
    return m;
}

/*
 * Maps fd[mmap_offset, +size) into the BAR as slot (a frontend memory region,
 * or the inflight area); takes ownership of fd.
 */
static bool vvu_slot_map(VirtIOVhostUser *s, VirtIOVhostUserRegion *slot,
                         const char *name, int fd, uint64_t gpa, uint64_t size,
                         uint64_t uaddr, uint64_t mmap_offset,
                         uint64_t *bar_offset, Error **errp)
{
    VVUMapping *map;
    MemoryRegion *mr;
    Object *owner;

    if (size == 0) {
        error_setg(errp, "region of 0 bytes at guest_phys_addr 0x%" PRIx64,
                   gpa);
        close(fd);
        return false;
    }
    /* Refused before anything is mapped for it. */
    if (size > s->shm_size) {
        error_setg(errp, "region of 0x%" PRIx64 " bytes does not fit the "
                   "0x%" PRIx64 "-byte shared memory BAR (shm-size)",
                   size, s->shm_size);
        close(fd);
        return false;
    }
    map = vvu_map_region(fd, mmap_offset, size, errp);
    /* The mapping holds the file; the fd is not needed any more. */
    close(fd);
    if (!map) {
        return false;
    }
    if (!vvu_find_bar_offset(s, map->len, bar_offset)) {
        error_setg(errp, "region of 0x%" PRIx64 " bytes does not fit the "
                   "0x%" PRIx64 "-byte shared memory BAR (shm-size) next to "
                   "the frontend's other regions", size, s->shm_size);
        munmap(map->addr, map->len);
        g_free(map);
        return false;
    }
    owner = object_new(TYPE_CONTAINER);
    object_property_add(owner, "vvu-mapping", "VVUMapping", NULL, NULL,
                        vvu_mapping_release, map);
    mr = g_new0(MemoryRegion, 1);
    memory_region_init_ram_ptr(mr, owner, name, map->len, map->addr);
    /* Freed with its owner, once the last reference (a flat view's) is gone. */
    OBJECT(mr)->free = g_free;
    memory_region_add_subregion(&s->shm, *bar_offset, mr);
    slot->mr = mr;
    slot->owner = owner;
    slot->guest_phys_addr = gpa;
    slot->memory_size = size;
    slot->map_len = map->len;
    slot->userspace_addr = uaddr;
    slot->bar_offset = *bar_offset;
    return true;
}

/* Maps a frontend memory region into the BAR; takes ownership of fd. */
static bool vvu_region_add(VirtIOVhostUser *s, const uint8_t *desc, int fd,
                           uint64_t *bar_offset, Error **errp)
{
    g_autofree char *name = NULL;

    for (int i = 0; i < VIRTIO_VHOST_USER_MAX_REGIONS; i++) {
        if (!s->regions[i].mr) {
            name = g_strdup_printf("virtio-vhost-user-region%d", i);
            return vvu_slot_map(s, &s->regions[i], name, fd, vvu_le64(desc),
                                vvu_le64(desc + 8), vvu_le64(desc + 16),
                                vvu_le64(desc + 24), bar_offset, errp);
        }
    }
    error_setg(errp, "all %d memory region slots are in use",
               VIRTIO_VHOST_USER_MAX_REGIONS);
    close(fd);
    return false;
}

static void vvu_region_del(VirtIOVhostUser *s, VirtIOVhostUserRegion *r)
{
    if (!r->mr) {
        return;
    }
    memory_region_del_subregion(&s->shm, r->mr);
    /*
     * Not object_unparent(): flat views still in an RCU grace period hold
     * the owner, which frees the region (its child) when they let go.
     */
    object_unref(r->owner);
    memset(r, 0, sizeof(*r));
}

static void vvu_regions_clear(VirtIOVhostUser *s)
{
    for (int i = 0; i < VIRTIO_VHOST_USER_MAX_REGIONS; i++) {
        vvu_region_del(s, &s->regions[i]);
    }
}

/* ---- kicks (front-end -> MSI-X) and doorbells (guest -> front-end) ------- */

/*
 * Whether fd is an eventfd. KVM takes nothing else as an ioeventfd, and QEMU
 * aborts when KVM refuses one; a kick fd that is not an eventfd would keep the
 * main loop spinning (a pipe at EOF is always readable).
 */
static bool vvu_is_eventfd(int fd)
{
    char link[32], target[32];
    struct stat st;
    ssize_t n;

    /*
     * An eventfd is an anonymous inode, without a file type (pipes, sockets,
     * files and devices have one).
     */
    if (fstat(fd, &st) < 0 || (st.st_mode & S_IFMT) != 0) {
        return false;
    }
    /* Other anonymous inodes (timerfd, epoll, ...) differ only in the link. */
    snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
    n = readlink(link, target, sizeof(target) - 1);
    if (n < 0) {
        /* No procfs: the file type check is all there is. */
        return errno == ENOENT && access("/proc/self/fd", F_OK) < 0;
    }
    target[n] = '\0';
    return strcmp(target, "anon_inode:[eventfd]") == 0;
}

static void vvu_kick_handler(EventNotifier *e)
{
    VirtIOVhostUserKick *k = container_of(e, VirtIOVhostUserKick, notifier);
    VirtIOVhostUser *s = k->owner;

    if (!event_notifier_test_and_clear(e)) {
        return;
    }
    if (!k->kicked) {
        k->kicked = true;
        trace_vvu_kick_first(k - s->kicks, k->vector);
    }
    if (k->vector == VIRTIO_NO_VECTOR) {
        trace_vvu_kick_unrouted(k - s->kicks);
    } else if (s->transport.notify) {
        s->transport.notify(s->transport.opaque, k->vector);
    }
}

static void vvu_kick_unwire(VirtIOVhostUser *s, unsigned idx)
{
    VirtIOVhostUserKick *k = &s->kicks[idx];

    if (k->wired) {
        trace_vvu_kick_unwire(idx);
        event_notifier_set_handler(&k->notifier, NULL);
        event_notifier_cleanup(&k->notifier);
        k->wired = false;
    }
}

static void vvu_kick_wire(VirtIOVhostUser *s, unsigned idx, int fd)
{
    VirtIOVhostUserKick *k = &s->kicks[idx];

    vvu_kick_unwire(s, idx);
    trace_vvu_kick_wire(idx, fd);
    event_notifier_init_fd(&k->notifier, fd);
    event_notifier_set_handler(&k->notifier, vvu_kick_handler);
    k->wired = true;
    k->kicked = false;
}

static void vvu_doorbell_unwire(VirtIOVhostUser *s, unsigned db)
{
    VirtIOVhostUserDoorbell *d = &s->doorbell[db];

    if (d->wired) {
        memory_region_del_eventfd(&s->doorbells,
                                  db * VIRTIO_VHOST_USER_DOORBELL_MULT, 2,
                                  false, 0, &d->notifier);
        event_notifier_cleanup(&d->notifier);
        d->wired = false;
    }
}

static void vvu_doorbell_wire(VirtIOVhostUser *s, unsigned db, int fd)
{
    VirtIOVhostUserDoorbell *d = &s->doorbell[db];

    vvu_doorbell_unwire(s, db);
    event_notifier_init_fd(&d->notifier, fd);
    /* A KVM ioeventfd when available; QEMU emulates it otherwise. */
    memory_region_add_eventfd(&s->doorbells,
                              db * VIRTIO_VHOST_USER_DOORBELL_MULT, 2,
                              false, 0, &d->notifier);
    d->wired = true;
}

static void vvu_ring_unwire(VirtIOVhostUser *s, unsigned idx)
{
    vvu_kick_unwire(s, idx);
    vvu_doorbell_unwire(s, idx);
    vvu_doorbell_unwire(s, s->max_vhost_queues + idx);
}

static void vvu_unwire_all(VirtIOVhostUser *s)
{
    for (unsigned i = 0; i < s->max_vhost_queues; i++) {
        vvu_ring_unwire(s, i);
    }
}

/* Doorbell accesses not caught by an ioeventfd (other sizes, or unwired). */
static void vvu_doorbell_write(void *opaque, hwaddr addr, uint64_t val,
                               unsigned size)
{
    VirtIOVhostUser *s = opaque;
    uint64_t db = addr / VIRTIO_VHOST_USER_DOORBELL_MULT;

    if (db < 2ull * s->max_vhost_queues && s->doorbell[db].wired) {
        event_notifier_set(&s->doorbell[db].notifier);
    }
}

static uint64_t vvu_doorbell_read(void *opaque, hwaddr addr, unsigned size)
{
    return 0;
}

static const MemoryRegionOps vvu_doorbell_ops = {
    .read = vvu_doorbell_read,
    .write = vvu_doorbell_write,
    .endianness = DEVICE_LITTLE_ENDIAN,
    .valid = { .min_access_size = 1, .max_access_size = 4 },
};

static uint64_t vvu_notification_read(void *opaque, hwaddr addr,
                                      unsigned size)
{
    VirtIOVhostUser *s = opaque;

    switch (addr) {
    case 0:
        return s->notification_select;
    case 2:
        if (s->notification_select >= s->max_vhost_queues) {
            return VIRTIO_NO_VECTOR;
        }
        return s->kicks[s->notification_select].vector;
    default:
        return 0;
    }
}

static void vvu_notification_write(void *opaque, hwaddr addr, uint64_t val,
                                   unsigned size)
{
    VirtIOVhostUser *s = opaque;
    VirtIOVhostUserKick *k;
    unsigned nr = s->transport.nr_vectors ?
                  s->transport.nr_vectors(s->transport.opaque) : 0;
    uint16_t vector = val;

    switch (addr) {
    case 0:
        s->notification_select = val;
        return;
    case 2:
        if (s->notification_select >= s->max_vhost_queues) {
            qemu_log_mask(LOG_GUEST_ERROR, "virtio-vhost-user: notification "
                          "select %u out of range\n", s->notification_select);
            return;
        }
        k = &s->kicks[s->notification_select];
        if (k->vector != VIRTIO_NO_VECTOR && s->transport.vector_unuse) {
            s->transport.vector_unuse(s->transport.opaque, k->vector);
        }
        if (vector != VIRTIO_NO_VECTOR && vector < nr) {
            s->transport.vector_use(s->transport.opaque, vector);
            k->vector = vector;
        } else {
            /* Read back as unmapped: the driver will poll this queue. */
            k->vector = VIRTIO_NO_VECTOR;
        }
        trace_vvu_notification_vector(s->notification_select, k->vector);
        return;
    default:
        return;
    }
}

static const MemoryRegionOps vvu_notification_ops = {
    .read = vvu_notification_read,
    .write = vvu_notification_write,
    .endianness = DEVICE_LITTLE_ENDIAN,
    .impl = { .min_access_size = 2, .max_access_size = 2 },
    .valid = { .min_access_size = 2, .max_access_size = 4 },
};

static void vvu_vectors_reset(VirtIOVhostUser *s)
{
    for (unsigned i = 0; i < s->max_vhost_queues; i++) {
        VirtIOVhostUserKick *k = &s->kicks[i];
        if (k->vector != VIRTIO_NO_VECTOR && s->transport.vector_unuse) {
            s->transport.vector_unuse(s->transport.opaque, k->vector);
        }
        k->vector = VIRTIO_NO_VECTOR;
    }
    s->notification_select = 0;
}

/* ---- front-end messages ------------------------------------------------- */

static void vvu_msg_reset(VirtIOVhostUser *s)
{
    for (int i = 0; i < s->msg_nfds; i++) {
        if (s->msg_fds[i] >= 0) {
            close(s->msg_fds[i]);
        }
    }
    s->msg_nfds = 0;
    s->msg_len = 0;
    s->msg_ready = false;
}

/* Takes fd i of the current message (the caller then owns it). */
static int vvu_msg_take_fd(VirtIOVhostUser *s, int i)
{
    int fd;

    if (i >= s->msg_nfds) {
        return -1;
    }
    fd = s->msg_fds[i];
    s->msg_fds[i] = -1;
    return fd;
}

static void vvu_send_u64_reply(VirtIOVhostUser *s, uint32_t request,
                               uint64_t value)
{
    uint8_t reply[VU_HDR_SIZE + 8];
    uint32_t hdr[3] = {
        cpu_to_le32(request),
        cpu_to_le32(VU_VERSION | VU_FLAG_REPLY),
        cpu_to_le32(8),
    };

    memcpy(reply, hdr, sizeof(hdr));
    vvu_put_le64(reply + VU_HDR_SIZE, value);
    qemu_chr_fe_write_all(&s->chr, reply, sizeof(reply));
}

static VVUAction vvu_mem_table(VirtIOVhostUser *s, Error **errp)
{
    uint8_t *payload = s->msg + VU_HDR_SIZE;
    uint32_t size = vvu_msg_size(s->msg);
    uint32_t nregions;

    if (size < 8) {
        error_setg(errp, "SET_MEM_TABLE payload of %u bytes", size);
        return VVU_PROTOCOL_ERROR;
    }
    nregions = vvu_le32(payload);
    if (nregions == 0 || nregions > VU_MEM_TABLE_MAX ||
        size < 8 + nregions * VU_REGION_SIZE || s->msg_nfds != nregions) {
        error_setg(errp, "SET_MEM_TABLE with %u regions, %d fds, %u bytes",
                   nregions, s->msg_nfds, size);
        return VVU_PROTOCOL_ERROR;
    }
    /* The new table replaces the old one entirely. */
    vvu_regions_clear(s);
    for (uint32_t i = 0; i < nregions; i++) {
        uint8_t *desc = payload + 8 + i * VU_REGION_SIZE;
        uint64_t bar_offset;

        if (!vvu_region_add(s, desc, vvu_msg_take_fd(s, i), &bar_offset,
                            errp)) {
            vvu_regions_clear(s);
            return VVU_REFUSE;
        }
        /* The driver finds region i at shm + mmap_offset. */
        vvu_put_le64(desc + 24, bar_offset);
    }
    return VVU_FORWARD;
}

static VVUAction vvu_add_mem_reg(VirtIOVhostUser *s, Error **errp)
{
    uint8_t *desc = s->msg + VU_HDR_SIZE + 8;
    uint64_t bar_offset;

    if (vvu_msg_size(s->msg) < 8 + VU_REGION_SIZE || s->msg_nfds != 1) {
        error_setg(errp, "malformed ADD_MEM_REG");
        return VVU_PROTOCOL_ERROR;
    }
    if (!vvu_region_add(s, desc, vvu_msg_take_fd(s, 0), &bar_offset, errp)) {
        return VVU_REFUSE;
    }
    vvu_put_le64(desc + 24, bar_offset);
    return VVU_FORWARD;
}

static VVUAction vvu_rem_mem_reg(VirtIOVhostUser *s, Error **errp)
{
    uint8_t *desc = s->msg + VU_HDR_SIZE + 8;
    uint64_t gpa, size;

    if (vvu_msg_size(s->msg) < 8 + VU_REGION_SIZE) {
        error_setg(errp, "malformed REM_MEM_REG");
        return VVU_PROTOCOL_ERROR;
    }
    gpa = vvu_le64(desc);
    size = vvu_le64(desc + 8);
    for (int i = 0; i < VIRTIO_VHOST_USER_MAX_REGIONS; i++) {
        VirtIOVhostUserRegion *r = &s->regions[i];
        if (r->mr && r->guest_phys_addr == gpa && r->memory_size == size) {
            vvu_put_le64(desc + 24, r->bar_offset);
            vvu_region_del(s, r);
            return VVU_FORWARD;
        }
    }
    error_setg(errp, "REM_MEM_REG of unknown region at 0x%" PRIx64, gpa);
    return VVU_REFUSE;
}

static VVUAction vvu_vring_fd(VirtIOVhostUser *s, Error **errp)
{
    uint32_t request = vvu_msg_request(s->msg);
    uint64_t payload;
    unsigned idx;
    int fd;

    if (vvu_msg_size(s->msg) < 8) {
        error_setg(errp, "vring fd message without payload");
        return VVU_PROTOCOL_ERROR;
    }
    payload = vvu_le64(s->msg + VU_HDR_SIZE);
    idx = payload & VU_VRING_IDX_MASK;
    if (idx >= s->max_vhost_queues) {
        error_setg(errp, "vring %u beyond max-vhost-queues %u", idx,
                   s->max_vhost_queues);
        return VVU_REFUSE;
    }
    if (payload & VU_VRING_NOFD) {
        /* No fd: the ring is polled; drop any previous wiring. */
        if (request == VU_SET_VRING_KICK) {
            vvu_kick_unwire(s, idx);
        } else {
            vvu_doorbell_unwire(s, request == VU_SET_VRING_CALL ?
                                   idx : s->max_vhost_queues + idx);
        }
        return VVU_FORWARD;
    }
    fd = vvu_msg_take_fd(s, 0);
    if (fd < 0) {
        error_setg(errp, "vring fd message without a file descriptor");
        return VVU_PROTOCOL_ERROR;
    }
    if (!vvu_is_eventfd(fd)) {
        close(fd);
        error_setg(errp, "the file descriptor for vring %u is not an eventfd",
                   idx);
        return VVU_REFUSE;
    }
    switch (request) {
    case VU_SET_VRING_KICK:
        vvu_kick_wire(s, idx, fd);
        break;
    case VU_SET_VRING_CALL:
        vvu_doorbell_wire(s, idx, fd);
        break;
    default:
        vvu_doorbell_wire(s, s->max_vhost_queues + idx, fd);
        break;
    }
    return VVU_FORWARD;
}

/*
 * SET_INFLIGHT_FD: the area the front-end keeps for the back-end's inflight
 * I/O tracking is mapped into the BAR like a memory region (replacing any
 * previous one), and the forwarded mmap_offset is its BAR offset.
 */
static VVUAction vvu_set_inflight(VirtIOVhostUser *s, Error **errp)
{
    uint8_t *p = s->msg + VU_HDR_SIZE;
    uint64_t bar_offset;

    if (vvu_msg_size(s->msg) < VU_INFLIGHT_MIN || s->msg_nfds != 1) {
        error_setg(errp, "SET_INFLIGHT_FD of %u bytes with %d fds",
                   vvu_msg_size(s->msg), s->msg_nfds);
        return VVU_PROTOCOL_ERROR;
    }
    vvu_region_del(s, &s->inflight);
    if (!vvu_slot_map(s, &s->inflight, "virtio-vhost-user-inflight",
                      vvu_msg_take_fd(s, 0), 0, vvu_le64(p), 0,
                      vvu_le64(p + 8), &bar_offset, errp)) {
        return VVU_REFUSE;
    }
    vvu_put_le64(p + 8, bar_offset);
    return VVU_FORWARD;
}

/*
 * The back-end's GET_INFLIGHT_FD reply gives the size of the area it wants
 * but cannot carry a file: the device creates the area (a zeroed memfd sealed
 * against resizing) and hands it to the front-end, which keeps it across
 * back-end restarts. A size beyond VVU_INFLIGHT_MAX or the BAR is answered 0
 * (QEMU then runs without inflight tracking).
 */
static void vvu_inflight_reply(VirtIOVhostUser *s, uint8_t *buf, size_t len)
{
    uint64_t size = vvu_le64(buf + VU_HDR_SIZE);
    Error *err = NULL;
    int fd = -1;

    if (size > VVU_INFLIGHT_MAX || size > s->shm_size) {
        warn_report("virtio-vhost-user: an inflight area of 0x%" PRIx64
                    " bytes is too large; answering none", size);
        size = 0;
    }
    if (size) {
        fd = qemu_memfd_create("virtio-vhost-user-inflight", size, false, 0,
                               F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL,
                               &err);
        if (fd < 0) {
            warn_report_err(err);
            size = 0;
        }
    }
    vvu_put_le64(buf + VU_HDR_SIZE, size);
    vvu_put_le64(buf + VU_HDR_SIZE + 8, 0);
    if (s->connected) {
        if (fd >= 0) {
            qemu_chr_fe_set_msgfds(&s->chr, &fd, 1);
        }
        qemu_chr_fe_write_all(&s->chr, buf, len);
    }
    if (fd >= 0) {
        close(fd);
    }
}

static VVUAction vvu_backend_req_fd(VirtIOVhostUser *s, Error **errp);

static VVUAction vvu_intercept(VirtIOVhostUser *s, Error **errp)
{
    uint32_t request = vvu_msg_request(s->msg);
    uint64_t v;

    switch (request) {
    case VU_GET_FEATURES:
    case VU_SET_FEATURES:
    case VU_SET_OWNER:
    case VU_RESET_OWNER:
    case VU_SET_VRING_NUM:
    case VU_SET_VRING_ADDR:
    case VU_SET_VRING_BASE:
    case VU_GET_PROTOCOL_FEATURES:
    case VU_GET_QUEUE_NUM:
    case VU_SET_VRING_ENABLE:
    case VU_GET_CONFIG:
    case VU_SET_CONFIG:
    case VU_GET_MAX_MEM_SLOTS:
    case VU_SET_STATUS:
    case VU_GET_STATUS:
    case VU_GET_INFLIGHT_FD:
        return VVU_FORWARD;
    case VU_SET_INFLIGHT_FD:
        return vvu_set_inflight(s, errp);
    case VU_RESET_DEVICE:
        vvu_unwire_all(s);
        return VVU_FORWARD;
    case VU_SET_MEM_TABLE:
        return vvu_mem_table(s, errp);
    case VU_ADD_MEM_REG:
        return vvu_add_mem_reg(s, errp);
    case VU_REM_MEM_REG:
        return vvu_rem_mem_reg(s, errp);
    case VU_GET_VRING_BASE:
        if (vvu_msg_size(s->msg) >= 8) {
            unsigned idx = vvu_le32(s->msg + VU_HDR_SIZE);
            if (idx < s->max_vhost_queues) {
                vvu_ring_unwire(s, idx);
            }
        }
        return VVU_FORWARD;
    case VU_SET_VRING_KICK:
    case VU_SET_VRING_CALL:
    case VU_SET_VRING_ERR:
        return vvu_vring_fd(s, errp);
    case VU_SET_BACKEND_REQ_FD:
        return vvu_backend_req_fd(s, errp);
    case VU_SET_PROTOCOL_FEATURES:
        if (vvu_msg_size(s->msg) < 8) {
            error_setg(errp, "SET_PROTOCOL_FEATURES without payload");
            return VVU_PROTOCOL_ERROR;
        }
        v = vvu_le64(s->msg + VU_HDR_SIZE) & VVU_PROTOCOL_FEATURES;
        vvu_put_le64(s->msg + VU_HDR_SIZE, v);
        return VVU_FORWARD;
    default:
        error_setg(errp, "request %u is not supported by this device",
                   request);
        return VVU_REFUSE;
    }
}

/* Puts a message into an rx buffer; false if none is available. */
static bool vvu_put_rx(VirtIOVhostUser *s, const uint8_t *msg, size_t len)
{
    VirtIODevice *vdev = VIRTIO_DEVICE(s);
    VirtQueueElement *elem;

    elem = virtqueue_pop(s->rxq, sizeof(VirtQueueElement));
    if (!elem) {
        return false;
    }
    if (iov_size(elem->in_sg, elem->in_num) < len) {
        virtqueue_push(s->rxq, elem, 0);
        virtio_notify(vdev, s->rxq);
        g_free(elem);
        error_report("virtio-vhost-user: rx buffer smaller than a %zu-byte "
                     "message; disconnecting the front-end", len);
        vvu_disconnect(s, true);
        return true;
    }
    iov_from_buf(elem->in_sg, elem->in_num, 0, msg, len);
    virtqueue_push(s->rxq, elem, len);
    virtio_notify(vdev, s->rxq);
    g_free(elem);
    return true;
}

/* Puts the received front-end message into an rx buffer, if one is free. */
static bool vvu_deliver(VirtIOVhostUser *s)
{
    if (!vvu_put_rx(s, s->msg, s->msg_len)) {
        return false;
    }
    vvu_msg_reset(s);
    return true;
}

/*
 * ---- backend channel (SET_BACKEND_REQ_FD) --------------------------------
 *
 * Backend-initiated requests arrive on txq without the REPLY flag and are
 * written to the channel; the front-end's replies on the channel go to rxq
 * (they carry the REPLY flag, which front-end requests never do).
 */

static void vvu_backend_read(void *opaque);

static void vvu_backend_close(VirtIOVhostUser *s)
{
    if (s->backend_fd >= 0) {
        qemu_set_fd_handler(s->backend_fd, NULL, NULL, NULL);
        close(s->backend_fd);
        s->backend_fd = -1;
    }
    s->backend_len = 0;
    s->backend_ready = false;
}

static void vvu_backend_open(VirtIOVhostUser *s, int fd)
{
    vvu_backend_close(s);
    s->backend_fd = fd;
    qemu_set_fd_handler(fd, vvu_backend_read, NULL, s);
}

/* Puts a complete reply into an rx buffer, then reads the channel again. */
static void vvu_backend_deliver(VirtIOVhostUser *s)
{
    if (!s->backend_ready ||
        !vvu_put_rx(s, s->backend_msg, s->backend_len)) {
        return;
    }
    s->backend_ready = false;
    s->backend_len = 0;
    if (s->backend_fd >= 0) {
        qemu_set_fd_handler(s->backend_fd, vvu_backend_read, NULL, s);
    }
}

static void vvu_backend_read(void *opaque)
{
    VirtIOVhostUser *s = opaque;
    uint32_t want, flags, size;
    ssize_t n;

    if (s->backend_len < VU_HDR_SIZE) {
        want = VU_HDR_SIZE - s->backend_len;
    } else {
        want = VU_HDR_SIZE + vvu_msg_size(s->backend_msg) - s->backend_len;
    }
    n = recv(s->backend_fd, s->backend_msg + s->backend_len, want,
             MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        return;
    }
    if (n <= 0) {
        /* The front-end closed the channel (or it failed): forget it. */
        vvu_backend_close(s);
        return;
    }
    s->backend_len += n;
    if (s->backend_len < VU_HDR_SIZE) {
        return;
    }
    flags = vvu_msg_flags(s->backend_msg);
    size = vvu_msg_size(s->backend_msg);
    if ((flags & VU_FLAG_VERSION_MASK) != VU_VERSION ||
        !(flags & VU_FLAG_REPLY) ||
        size > VIRTIO_VHOST_USER_MAX_MSG - VU_HDR_SIZE) {
        warn_report("virtio-vhost-user: bad message on the backend channel "
                    "(request %u, flags 0x%x, size %u); closing it",
                    vvu_msg_request(s->backend_msg), flags, size);
        vvu_backend_close(s);
        return;
    }
    if (s->backend_len == VU_HDR_SIZE + size) {
        /* Read no further until this reply is on rxq. */
        s->backend_ready = true;
        qemu_set_fd_handler(s->backend_fd, NULL, NULL, NULL);
        vvu_backend_deliver(s);
    }
}

/* Writes a backend request from txq to the channel. */
static void vvu_backend_send(VirtIOVhostUser *s, const uint8_t *msg,
                             size_t len)
{
    ssize_t n;

    if (s->backend_fd < 0) {
        qemu_log_mask(LOG_GUEST_ERROR, "virtio-vhost-user: backend request "
                      "%u without a backend channel dropped\n",
                      vvu_msg_request(msg));
        return;
    }
    do {
        n = send(s->backend_fd, msg, len, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n != (ssize_t)len) {
        warn_report("virtio-vhost-user: writing to the backend channel "
                    "failed (%s); closing it",
                    n < 0 ? strerror(errno) : "short write");
        vvu_backend_close(s);
    }
}

static VVUAction vvu_backend_req_fd(VirtIOVhostUser *s, Error **errp)
{
    if (s->msg_nfds != 1) {
        error_setg(errp, "SET_BACKEND_REQ_FD with %d file descriptors",
                   s->msg_nfds);
        return VVU_PROTOCOL_ERROR;
    }
    vvu_backend_open(s, vvu_msg_take_fd(s, 0));
    return VVU_FORWARD;
}

static void vvu_process_msg(VirtIOVhostUser *s)
{
    Error *err = NULL;
    uint32_t request = vvu_msg_request(s->msg);

    trace_vvu_msg(request, vvu_msg_size(s->msg), s->msg_nfds);
    switch (vvu_intercept(s, &err)) {
    case VVU_FORWARD:
        s->msg_ready = true;
        if (!vvu_deliver(s)) {
            /* Wait for the driver to post an rx buffer (vvu_handle_rx). */
            return;
        }
        break;
    case VVU_REFUSE:
        warn_report("virtio-vhost-user: refused request %u: %s", request,
                    error_get_pretty(err));
        if (vvu_msg_flags(s->msg) & VU_FLAG_NEED_REPLY) {
            vvu_send_u64_reply(s, request, 1);
            vvu_msg_reset(s);
        } else {
            vvu_disconnect(s, true);
        }
        break;
    case VVU_PROTOCOL_ERROR:
        warn_report("virtio-vhost-user: front-end protocol error: %s; "
                    "disconnecting", error_get_pretty(err));
        vvu_disconnect(s, true);
        break;
    }
    error_free(err);
}

static int vvu_can_read(void *opaque)
{
    VirtIOVhostUser *s = opaque;

    if (!s->connected || s->msg_ready) {
        return 0;
    }
    if (s->msg_len < VU_HDR_SIZE) {
        return VU_HDR_SIZE - s->msg_len;
    }
    return VU_HDR_SIZE + vvu_msg_size(s->msg) - s->msg_len;
}

static void vvu_read(void *opaque, const uint8_t *buf, int size)
{
    VirtIOVhostUser *s = opaque;
    int fds[VIRTIO_VHOST_USER_MAX_FDS];
    int nfds, want = vvu_can_read(s);

    nfds = qemu_chr_fe_get_msgfds(&s->chr, fds, ARRAY_SIZE(fds));
    if (nfds > 0 && s->recv_delay_ms) {
        g_usleep(s->recv_delay_ms * 1000ull);
    }
    for (int i = 0; i < nfds; i++) {
        /*
         * The chardev leaves the fds as the front-end made them (see realize).
         * This device never blocks on them: its reads are of eventfds that
         * poll reported readable, which only a non-blocking fd makes safe if
         * the front-end reads the same eventfd. QEMU's eventfds already are.
         */
        qemu_socket_set_nonblock(fds[i]);
        if (s->msg_nfds < VIRTIO_VHOST_USER_MAX_FDS) {
            s->msg_fds[s->msg_nfds++] = fds[i];
        } else {
            close(fds[i]);
        }
    }
    if (size > want) {
        /* can_read bounds every read; anything else is a chardev bug. */
        size = want;
    }
    memcpy(s->msg + s->msg_len, buf, size);
    s->msg_len += size;

    if (s->msg_len == VU_HDR_SIZE) {
        uint32_t flags = vvu_msg_flags(s->msg);
        uint32_t msg_size = vvu_msg_size(s->msg);

        if ((flags & VU_FLAG_VERSION_MASK) != VU_VERSION ||
            (flags & VU_FLAG_REPLY) ||
            msg_size > VIRTIO_VHOST_USER_MAX_MSG - VU_HDR_SIZE) {
            warn_report("virtio-vhost-user: bad message header (request %u, "
                        "flags 0x%x, size %u); disconnecting",
                        vvu_msg_request(s->msg), flags, msg_size);
            vvu_disconnect(s, true);
            return;
        }
    }
    if (s->msg_len >= VU_HDR_SIZE &&
        s->msg_len == VU_HDR_SIZE + vvu_msg_size(s->msg)) {
        vvu_process_msg(s);
    }
}

/* ---- guest -> front-end ------------------------------------------------- */

static void vvu_handle_rx(VirtIODevice *vdev, VirtQueue *vq)
{
    VirtIOVhostUser *s = VIRTIO_VHOST_USER(vdev);

    vvu_backend_deliver(s);
    if (s->msg_ready && vvu_deliver(s)) {
        qemu_chr_fe_accept_input(&s->chr);
    }
}

static void vvu_handle_tx(VirtIODevice *vdev, VirtQueue *vq)
{
    VirtIOVhostUser *s = VIRTIO_VHOST_USER(vdev);
    VirtQueueElement *elem;
    uint8_t buf[VIRTIO_VHOST_USER_MAX_MSG];

    while ((elem = virtqueue_pop(vq, sizeof(VirtQueueElement)))) {
        size_t len = iov_size(elem->out_sg, elem->out_num);
        uint32_t request, flags;

        if (len < VU_HDR_SIZE || len > sizeof(buf)) {
            virtqueue_detach_element(vq, elem, 0);
            g_free(elem);
            virtio_error(vdev, "virtio-vhost-user: txq buffer of %zu bytes",
                         len);
            return;
        }
        iov_to_buf(elem->out_sg, elem->out_num, 0, buf, len);
        request = vvu_msg_request(buf);
        flags = vvu_msg_flags(buf);
        if (vvu_msg_size(buf) != len - VU_HDR_SIZE ||
            (flags & VU_FLAG_VERSION_MASK) != VU_VERSION) {
            virtqueue_detach_element(vq, elem, 0);
            g_free(elem);
            virtio_error(vdev, "virtio-vhost-user: malformed txq message "
                         "(request %u, flags 0x%x, %zu bytes)", request,
                         flags, len);
            return;
        }
        if (!(flags & VU_FLAG_REPLY)) {
            /* A backend-initiated request. */
            vvu_backend_send(s, buf, len);
            virtqueue_push(vq, elem, 0);
            g_free(elem);
            continue;
        }
        if (request == VU_GET_INFLIGHT_FD &&
            len >= VU_HDR_SIZE + VU_INFLIGHT_MIN) {
            vvu_inflight_reply(s, buf, len);
            virtqueue_push(vq, elem, 0);
            g_free(elem);
            continue;
        }
        if (len == VU_HDR_SIZE + 8) {
            uint64_t v = vvu_le64(buf + VU_HDR_SIZE);
            switch (request) {
            case VU_GET_PROTOCOL_FEATURES:
                vvu_put_le64(buf + VU_HDR_SIZE, v & VVU_PROTOCOL_FEATURES);
                break;
            case VU_GET_FEATURES:
                /* Dirty logging needs LOG_SHMFD, which cannot be carried. */
                vvu_put_le64(buf + VU_HDR_SIZE, v & ~(1ull << VHOST_F_LOG_ALL));
                break;
            case VU_GET_MAX_MEM_SLOTS:
                vvu_put_le64(buf + VU_HDR_SIZE,
                             MIN(v, VIRTIO_VHOST_USER_MAX_REGIONS));
                break;
            default:
                break;
            }
        }
        trace_vvu_reply(request, len - VU_HDR_SIZE);
        if (s->connected) {
            qemu_chr_fe_write_all(&s->chr, buf, len);
        }
        virtqueue_push(vq, elem, 0);
        g_free(elem);
    }
    virtio_notify(vdev, vq);
}

/* ---- connection state --------------------------------------------------- */

static void vvu_connect(VirtIOVhostUser *s)
{
    s->connected = true;
    s->status |= VIRTIO_VHOST_USER_STATUS_FRONTEND_UP;
    vvu_msg_reset(s);
    virtio_notify_config(VIRTIO_DEVICE(s));
    qemu_chr_fe_accept_input(&s->chr);
}

/*
 * Ends the session: the front-end's memory is unmapped and its eventfds are
 * released, so nothing of a departed front-end stays reachable.
 */
static void vvu_disconnect(VirtIOVhostUser *s, bool close_socket)
{
    bool was_connected = s->connected;

    s->connected = false;
    s->status &= ~VIRTIO_VHOST_USER_STATUS_FRONTEND_UP;
    vvu_msg_reset(s);
    vvu_backend_close(s);
    vvu_unwire_all(s);
    vvu_regions_clear(s);
    vvu_region_del(s, &s->inflight);
    if (close_socket && s->chr_open) {
        qemu_chr_fe_disconnect(&s->chr);
    }
    if (was_connected) {
        s->awaiting_ack = true;
        virtio_notify_config(VIRTIO_DEVICE(s));
    }
}

static void vvu_chr_event(void *opaque, QEMUChrEvent event)
{
    VirtIOVhostUser *s = opaque;

    switch (event) {
    case CHR_EVENT_OPENED:
        s->chr_open = true;
        if ((s->status & VIRTIO_VHOST_USER_STATUS_BACKEND_UP) &&
            !s->connected && !s->awaiting_ack) {
            vvu_connect(s);
        }
        break;
    case CHR_EVENT_CLOSED:
        s->chr_open = false;
        if (s->connected) {
            vvu_disconnect(s, false);
        }
        break;
    default:
        break;
    }
}

/* ---- VirtIODevice ------------------------------------------------------- */

static void vvu_get_config(VirtIODevice *vdev, uint8_t *config)
{
    VirtIOVhostUser *s = VIRTIO_VHOST_USER(vdev);
    VirtIOVhostUserConfig cfg = {
        .status = cpu_to_le32(s->status),
        .max_vhost_queues = cpu_to_le32(s->max_vhost_queues),
    };

    memcpy(cfg.uuid, s->uuid.data, sizeof(cfg.uuid));
    memcpy(config, &cfg, sizeof(cfg));
}

static void vvu_set_config(VirtIODevice *vdev, const uint8_t *config)
{
    VirtIOVhostUser *s = VIRTIO_VHOST_USER(vdev);
    uint32_t status = vvu_le32(config);
    bool was_up = s->status & VIRTIO_VHOST_USER_STATUS_BACKEND_UP;
    bool up = status & VIRTIO_VHOST_USER_STATUS_BACKEND_UP;

    if (status & ~(VIRTIO_VHOST_USER_STATUS_BACKEND_UP |
                   VIRTIO_VHOST_USER_STATUS_FRONTEND_UP)) {
        virtio_error(vdev, "virtio-vhost-user: reserved status bits 0x%x "
                     "written", status);
        return;
    }
    if (up && (!was_up || s->awaiting_ack)) {
        /* Up, or the previous session's end acknowledged: take the next one. */
        s->status |= VIRTIO_VHOST_USER_STATUS_BACKEND_UP;
        s->awaiting_ack = false;
        if (s->chr_open && !s->connected) {
            vvu_connect(s);
        }
    } else if (!up && was_up) {
        s->status &= ~VIRTIO_VHOST_USER_STATUS_BACKEND_UP;
        /* The front-end comes back (reconnect-ms) once the driver is up. */
        vvu_disconnect(s, true);
    }
}

static uint64_t vvu_get_features(VirtIODevice *vdev, uint64_t features,
                                 Error **errp)
{
    /* No device-specific feature bits. */
    return features;
}

static void vvu_reset(VirtIODevice *vdev)
{
    VirtIOVhostUser *s = VIRTIO_VHOST_USER(vdev);

    trace_vvu_reset();
    vvu_disconnect(s, true);
    s->status = 0;
    s->awaiting_ack = false;
    vvu_vectors_reset(s);
}

static void vvu_device_realize(DeviceState *dev, Error **errp)
{
    VirtIODevice *vdev = VIRTIO_DEVICE(dev);
    VirtIOVhostUser *s = VIRTIO_VHOST_USER(dev);
    uint64_t aux_size;

    if (!qemu_chr_fe_backend_connected(&s->chr)) {
        error_setg(errp, "virtio-vhost-user: 'chardev' is required");
        return;
    }
    if (s->max_vhost_queues == 0 || s->max_vhost_queues > 256) {
        error_setg(errp, "virtio-vhost-user: max-vhost-queues must be in "
                   "1..256 (the vring index is 8 bits wide)");
        return;
    }
    if (s->queue_size < 2 || s->queue_size > VIRTQUEUE_MAX_SIZE ||
        !is_power_of_2(s->queue_size)) {
        error_setg(errp, "virtio-vhost-user: queue-size must be a power of "
                   "2 in 2..%d", VIRTQUEUE_MAX_SIZE);
        return;
    }
    if (s->shm_size < VIRTIO_VHOST_USER_REGION_ALIGN ||
        !is_power_of_2(s->shm_size)) {
        error_setg(errp, "virtio-vhost-user: shm-size must be a power of 2 "
                   "of at least 2 MiB");
        return;
    }

    s->backend_fd = -1;
    virtio_init(vdev, VIRTIO_ID_VHOST_USER, sizeof(VirtIOVhostUserConfig));
    s->rxq = virtio_add_queue(vdev, s->queue_size, vvu_handle_rx);
    s->txq = virtio_add_queue(vdev, s->queue_size, vvu_handle_tx);

    s->kicks = g_new0(VirtIOVhostUserKick, s->max_vhost_queues);
    for (unsigned i = 0; i < s->max_vhost_queues; i++) {
        s->kicks[i].owner = s;
        s->kicks[i].vector = VIRTIO_NO_VECTOR;
    }
    /* call 0..N-1, err N..2N-1, log 2N (reserved) */
    s->doorbell = g_new0(VirtIOVhostUserDoorbell, 2 * s->max_vhost_queues + 1);

    s->doorbells_size = pow2ceil(MAX((2ull * s->max_vhost_queues + 1) *
                                     VIRTIO_VHOST_USER_DOORBELL_MULT, 4096));
    s->notification_offset = s->doorbells_size;
    aux_size = pow2ceil(s->doorbells_size + 4096);
    memory_region_init(&s->aux, OBJECT(s), "virtio-vhost-user-aux", aux_size);
    memory_region_init_io(&s->doorbells, OBJECT(s), &vvu_doorbell_ops, s,
                          "virtio-vhost-user-doorbells", s->doorbells_size);
    memory_region_add_subregion(&s->aux, 0, &s->doorbells);
    memory_region_init_io(&s->notification, OBJECT(s), &vvu_notification_ops,
                          s, "virtio-vhost-user-notification", 4096);
    memory_region_add_subregion(&s->aux, s->notification_offset,
                                &s->notification);
    memory_region_init(&s->shm, OBJECT(s), "virtio-vhost-user-shm",
                       s->shm_size);

    /*
     * The front-end's eventfds arrive by SCM_RIGHTS and share their open file
     * description, O_NONBLOCK included, with the front-end. QEMU's socket
     * channel and chardev make received fds blocking; for the moment until
     * vvu_read restored the flag, a front-end reading its own eventfd blocked
     * for good if nothing was pending. Stock QEMU (10.0) does that with the
     * BQL held on two paths with KVM irqfds: the devices with
     * guest_notifier_pending (virtio-net, vhost-user-fs, -gpu, -vsock...)
     * send a vring's masked call notifier on each MSI-X mask and read it on
     * the unmask right after (vhost_virtqueue_pending); and a guest read of
     * the MSI-X PBA makes any virtio-pci front-end read a masked vector's
     * call eventfd (virtio_pci_vector_poll). The consumer VM would freeze.
     * vhost-user-blk and -scsi under TCG read none inside the window.
     * Patch 0002 lets the chardev leave the flags alone. x-keep-msgfd-flags=off
     * (test hook) restores the old behaviour, so tests can show what it did.
     */
    if (s->keep_msgfd_flags &&
        object_dynamic_cast(OBJECT(qemu_chr_fe_get_driver(&s->chr)),
                            TYPE_CHARDEV_SOCKET)) {
        SOCKET_CHARDEV(qemu_chr_fe_get_driver(&s->chr))->keep_msgfd_flags =
            true;
    }
    qemu_chr_fe_set_handlers(&s->chr, vvu_can_read, vvu_read, vvu_chr_event,
                             NULL, s, NULL, true);
}

static void vvu_device_unrealize(DeviceState *dev)
{
    VirtIODevice *vdev = VIRTIO_DEVICE(dev);
    VirtIOVhostUser *s = VIRTIO_VHOST_USER(dev);

    qemu_chr_fe_set_handlers(&s->chr, NULL, NULL, NULL, NULL, NULL, NULL,
                             false);
    vvu_disconnect(s, false);
    vvu_vectors_reset(s);
    qemu_chr_fe_deinit(&s->chr, false);
    g_free(s->kicks);
    g_free(s->doorbell);
    virtio_delete_queue(s->rxq);
    virtio_delete_queue(s->txq);
    virtio_cleanup(vdev);
}

/* Front-end fds and mappings cannot be migrated. */
static const VMStateDescription vmstate_virtio_vhost_user = {
    .name = "virtio-vhost-user",
    .unmigratable = 1,
};

static const Property virtio_vhost_user_properties[] = {
    DEFINE_PROP_CHR("chardev", VirtIOVhostUser, chr),
    DEFINE_PROP_UINT32("max-vhost-queues", VirtIOVhostUser, max_vhost_queues,
                       64),
    DEFINE_PROP_UINT32("queue-size", VirtIOVhostUser, queue_size, 128),
    DEFINE_PROP_SIZE("shm-size", VirtIOVhostUser, shm_size, 16 * GiB),
    DEFINE_PROP_UUID("uuid", VirtIOVhostUser, uuid),
    /*
     * Test hook: milliseconds to hold each read from the front-end's socket
     * that carried file descriptors, before the device handles them.
     */
    DEFINE_PROP_UINT32("x-recv-delay-ms", VirtIOVhostUser, recv_delay_ms, 0),
    /*
     * Test hook: off lets the chardev clear O_NONBLOCK on received fds, as
     * QEMU's chardevs do, until vvu_read sets it again (the behaviour before
     * patch 0002; issue #18).
     */
    DEFINE_PROP_BOOL("x-keep-msgfd-flags", VirtIOVhostUser, keep_msgfd_flags,
                     true),
};

static void virtio_vhost_user_class_init(ObjectClass *klass, void *data)
{
    DeviceClass *dc = DEVICE_CLASS(klass);
    VirtioDeviceClass *vdc = VIRTIO_DEVICE_CLASS(klass);

    device_class_set_props(dc, virtio_vhost_user_properties);
    dc->vmsd = &vmstate_virtio_vhost_user;
    set_bit(DEVICE_CATEGORY_MISC, dc->categories);
    vdc->realize = vvu_device_realize;
    vdc->unrealize = vvu_device_unrealize;
    vdc->get_config = vvu_get_config;
    vdc->set_config = vvu_set_config;
    vdc->get_features = vvu_get_features;
    vdc->reset = vvu_reset;
}

static const TypeInfo virtio_vhost_user_info = {
    .name = TYPE_VIRTIO_VHOST_USER,
    .parent = TYPE_VIRTIO_DEVICE,
    .instance_size = sizeof(VirtIOVhostUser),
    .class_init = virtio_vhost_user_class_init,
};

static void virtio_vhost_user_register_types(void)
{
    type_register_static(&virtio_vhost_user_info);
}

type_init(virtio_vhost_user_register_types)
