/*
 * virtio-vhost-user: lets a guest act as a vhost-user back-end.
 *
 * The device terminates a vhost-user socket (the chardev) and tunnels the
 * protocol into the guest: front-end messages arrive on rxq, the guest's
 * replies leave on txq. File descriptors become device resources: the
 * front-end's memory appears in a shared-memory BAR, call/err eventfds are
 * wired to doorbells, and kick eventfds to MSI-X vectors.
 * The guest-visible ABI is specified in design/VVU-SPEC.md.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef QEMU_VIRTIO_VHOST_USER_H
#define QEMU_VIRTIO_VHOST_USER_H

#include "hw/virtio/virtio.h"
#include "chardev/char-fe.h"
#include "qemu/event_notifier.h"
#include "qemu/uuid.h"

#define TYPE_VIRTIO_VHOST_USER "virtio-vhost-user-device"
OBJECT_DECLARE_SIMPLE_TYPE(VirtIOVhostUser, VIRTIO_VHOST_USER)

/* Not assigned by OASIS; the 2022 draft's number. */
#define VIRTIO_ID_VHOST_USER 43

/* Config space status bits. */
#define VIRTIO_VHOST_USER_STATUS_BACKEND_UP  (1u << 0)
#define VIRTIO_VHOST_USER_STATUS_FRONTEND_UP (1u << 1)

/* Vendor-specific virtio PCI capabilities. */
#define VIRTIO_PCI_CAP_DOORBELL_CFG     6
#define VIRTIO_PCI_CAP_NOTIFICATION_CFG 7
#define VIRTIO_VHOST_USER_SHM_ID_MEMORY 1

#define VIRTIO_VHOST_USER_DOORBELL_MULT 4
/* One message per rx buffer; drivers post buffers of at least this size. */
#define VIRTIO_VHOST_USER_MAX_MSG       4096
#define VIRTIO_VHOST_USER_MAX_FDS       8
/* Front-end memory regions the shared-memory BAR can hold at once. */
#define VIRTIO_VHOST_USER_MAX_REGIONS   32
/* Regions are placed at this alignment so the guest can map them large. */
#define VIRTIO_VHOST_USER_REGION_ALIGN  (2 * MiB)

typedef struct VirtIOVhostUserConfig {
    uint32_t status;
    uint32_t max_vhost_queues;
    uint8_t uuid[16];
} QEMU_PACKED VirtIOVhostUserConfig;

/* How the device raises MSI-X vectors; provided by the PCI proxy. */
typedef struct VirtIOVhostUserTransport {
    void *opaque;
    /* Number of MSI-X vectors, 0 when MSI-X is absent. */
    unsigned (*nr_vectors)(void *opaque);
    void (*vector_use)(void *opaque, unsigned vector);
    void (*vector_unuse)(void *opaque, unsigned vector);
    void (*notify)(void *opaque, unsigned vector);
} VirtIOVhostUserTransport;

typedef struct VirtIOVhostUserRegion {
    MemoryRegion *mr;           /* NULL when the slot is free */
    /*
     * The region's own QOM owner. Flat views reference a memory region by
     * its owner, so a region owned by the device itself could be freed while
     * an RCU-deferred flat view still points at it; with an owner of its own,
     * dropping our reference frees it after the last flat view is gone.
     */
    Object *owner;
    uint64_t guest_phys_addr;
    uint64_t memory_size;       /* as the frontend gave it */
    uint64_t map_len;           /* memory_size rounded up to the file's page */
    uint64_t userspace_addr;
    uint64_t bar_offset;
} VirtIOVhostUserRegion;

typedef struct VirtIOVhostUserKick {
    EventNotifier notifier;
    struct VirtIOVhostUser *owner;
    bool wired;
    bool kicked;                /* a kick arrived since wired (for tracing) */
    uint16_t vector;            /* VIRTIO_NO_VECTOR when unmapped */
} VirtIOVhostUserKick;

typedef struct VirtIOVhostUserDoorbell {
    EventNotifier notifier;
    bool wired;
} VirtIOVhostUserDoorbell;

struct VirtIOVhostUser {
    VirtIODevice parent_obj;

    /* Properties */
    CharBackend chr;
    uint32_t max_vhost_queues;
    uint32_t queue_size;
    uint64_t shm_size;
    uint32_t recv_delay_ms;     /* x-recv-delay-ms: test hook, 0 = off */
    bool keep_msgfd_flags;      /* x-keep-msgfd-flags: test hook, default on */
    QemuUUID uuid;

    VirtQueue *rxq;
    VirtQueue *txq;
    uint32_t status;
    bool chr_open;              /* a front-end socket is open */
    bool connected;             /* BACKEND_UP and open: messages flow */
    /*
     * A session ended and the driver has not yet acknowledged it (by writing
     * BACKEND_UP again): the next front-end waits, so none of its messages
     * can reach rxq before the driver has closed the previous session.
     */
    bool awaiting_ack;

    /* The front-end message being received. */
    uint8_t msg[VIRTIO_VHOST_USER_MAX_MSG];
    uint32_t msg_len;
    int msg_fds[VIRTIO_VHOST_USER_MAX_FDS];
    int msg_nfds;
    bool msg_ready;             /* complete, waiting for an rx buffer */

    /*
     * The backend channel (SET_BACKEND_REQ_FD): backend requests from txq go
     * out on it, and the front-end's replies come back on it for rxq.
     */
    int backend_fd;             /* -1 when there is none */
    uint8_t backend_msg[VIRTIO_VHOST_USER_MAX_MSG];
    uint32_t backend_len;
    bool backend_ready;         /* a complete reply waits for an rx buffer */

    /* BAR resources, registered by the PCI proxy. */
    MemoryRegion aux;           /* container: doorbells + notification cfg */
    MemoryRegion doorbells;
    MemoryRegion notification;
    MemoryRegion shm;
    uint64_t doorbells_size;
    uint64_t notification_offset;

    uint16_t notification_select;
    VirtIOVhostUserKick *kicks;          /* max_vhost_queues */
    VirtIOVhostUserDoorbell *doorbell;   /* 2 * max_vhost_queues (+ log) */
    VirtIOVhostUserRegion regions[VIRTIO_VHOST_USER_MAX_REGIONS];
    /* The front-end's inflight area (SET_INFLIGHT_FD), mapped like a region. */
    VirtIOVhostUserRegion inflight;

    VirtIOVhostUserTransport transport;
};

#endif
