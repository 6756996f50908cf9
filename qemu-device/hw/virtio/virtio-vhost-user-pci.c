/*
 * virtio-vhost-user PCI transport.
 *
 * BAR layout (design/VVU-SPEC.md):
 *   BAR 0  32-bit memory: doorbells at 0 (cfg_type 6), notification
 *          structure after them (cfg_type 7)
 *   BAR 1  MSI-X table and PBA
 *   BAR 2  64-bit prefetchable memory: front-end memory, from offset 0
 *          (shared memory cap, id 1); mapped only while the guest keeps the
 *          BAR inside its physical address space
 *   BAR 4  modern virtio structures (common, ISR, device, notify)
 * The device is modern-only (PCI ID 1af4:106b).
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qemu/module.h"
#include "qom/object.h"
#include "hw/core/cpu.h"
#include "hw/pci/msix.h"
#include "hw/pci/pci.h"
#include "hw/qdev-properties.h"
#include "hw/virtio/virtio-pci.h"
#include "hw/virtio/virtio-vhost-user.h"
#include "standard-headers/linux/virtio_pci.h"
#include "trace.h"

#define VIRTIO_VHOST_USER_AUX_BAR 0
#define VIRTIO_VHOST_USER_SHM_BAR 2

typedef struct VirtIOVhostUserPCI VirtIOVhostUserPCI;

#define TYPE_VIRTIO_VHOST_USER_PCI "virtio-vhost-user-pci-base"
DECLARE_INSTANCE_CHECKER(VirtIOVhostUserPCI, VIRTIO_VHOST_USER_PCI,
                         TYPE_VIRTIO_VHOST_USER_PCI)

struct VirtIOVhostUserPCI {
    VirtIOPCIProxy parent_obj;
    VirtIOVhostUser vdev;
    /* virtio-pci's config space write handler, which ours wraps. */
    PCIConfigWriteFunc *parent_config_write;
};

struct vvu_doorbell_cap {
    struct virtio_pci_cap cap;
    uint32_t doorbell_off_multiplier;
};

static unsigned vvu_pci_nr_vectors(void *opaque)
{
    VirtIOPCIProxy *proxy = opaque;

    return msix_present(&proxy->pci_dev) ? proxy->nvectors : 0;
}

static void vvu_pci_vector_use(void *opaque, unsigned vector)
{
    VirtIOPCIProxy *proxy = opaque;

    msix_vector_use(&proxy->pci_dev, vector);
}

static void vvu_pci_vector_unuse(void *opaque, unsigned vector)
{
    VirtIOPCIProxy *proxy = opaque;

    msix_vector_unuse(&proxy->pci_dev, vector);
}

static void vvu_pci_notify(void *opaque, unsigned vector)
{
    VirtIOPCIProxy *proxy = opaque;

    /* Vectors are range-checked when the driver maps them. */
    if (msix_enabled(&proxy->pci_dev) && vector < proxy->nvectors) {
        if (!proxy->pci_dev.msix_entry_used[vector]) {
            /* msix_notify drops it: no user holds the vector (a reset freed them). */
            trace_vvu_pci_notify_unused(vector);
        } else if (msix_is_masked(&proxy->pci_dev, vector)) {
            /* Left pending in the PBA until the driver unmasks it. */
            trace_vvu_pci_notify_held(vector, 1, 1);
        }
        msix_notify(&proxy->pci_dev, vector);
    } else {
        trace_vvu_pci_notify_held(vector, msix_enabled(&proxy->pci_dev), 0);
    }
}

/*
 * One past the highest guest physical address the vCPUs can reach (the CPU's
 * phys-bits), or 0 when the machine does not say.
 */
static uint64_t vvu_pci_addressable(void)
{
    uint64_t bits;

    if (!first_cpu) {
        return 0;
    }
    bits = object_property_get_uint(OBJECT(first_cpu), "phys-bits", NULL);
    return bits && bits < 64 ? 1ull << bits : 0;
}

/*
 * Front-end memory is mapped into the shared-memory BAR only while the BAR
 * lies inside the guest's physical address space. Under KVM each mapped
 * region becomes a memory slot, KVM refuses a slot beyond the guest's
 * physical address width, and QEMU aborts when KVM refuses one
 * (kvm_set_phys_mem); the guest may program the 64-bit BAR anywhere. Beyond
 * that, the BAR reads as unassigned memory. Decided in the same memory
 * transaction as the BAR move, so the out-of-range mapping never exists.
 */
static void vvu_pci_config_write(PCIDevice *pci_dev, uint32_t addr,
                                 uint32_t val, int len)
{
    VirtIOVhostUserPCI *dev = VIRTIO_VHOST_USER_PCI(pci_dev);
    VirtIOVhostUser *vvu = &dev->vdev;
    uint64_t limit = vvu_pci_addressable();
    pcibus_t bar;

    memory_region_transaction_begin();
    dev->parent_config_write(pci_dev, addr, val, len);
    bar = pci_get_bar_addr(pci_dev, VIRTIO_VHOST_USER_SHM_BAR);
    memory_region_set_enabled(&vvu->shm, bar == PCI_BAR_UNMAPPED || !limit ||
                              (bar < limit && vvu->shm_size <= limit - bar));
    memory_region_transaction_commit();
}

/* Adds a vendor-specific virtio capability (like virtio-pci's own). */
static void vvu_pci_add_cap(VirtIOPCIProxy *proxy, struct virtio_pci_cap *cap,
                            Error **errp)
{
    PCIDevice *dev = &proxy->pci_dev;
    int offset = pci_add_capability(dev, PCI_CAP_ID_VNDR, 0, cap->cap_len,
                                    errp);

    if (offset < 0) {
        return;
    }
    memcpy(dev->config + offset + PCI_CAP_FLAGS, &cap->cap_len,
           cap->cap_len - PCI_CAP_FLAGS);
}

static void vvu_pci_realize(VirtIOPCIProxy *vpci_dev, Error **errp)
{
    VirtIOVhostUserPCI *dev = VIRTIO_VHOST_USER_PCI(vpci_dev);
    VirtIOVhostUser *vvu = &dev->vdev;
    Error *local_err = NULL;
    struct vvu_doorbell_cap doorbell = {
        .cap.cap_len = sizeof(doorbell),
        .cap.cfg_type = VIRTIO_PCI_CAP_DOORBELL_CFG,
        .cap.bar = VIRTIO_VHOST_USER_AUX_BAR,
        .doorbell_off_multiplier =
            cpu_to_le32(VIRTIO_VHOST_USER_DOORBELL_MULT),
    };
    struct virtio_pci_cap notification = {
        .cap_len = sizeof(notification),
        .cfg_type = VIRTIO_PCI_CAP_NOTIFICATION_CFG,
        .bar = VIRTIO_VHOST_USER_AUX_BAR,
        .length = cpu_to_le32(4),
    };

    if (vpci_dev->nvectors == DEV_NVECTORS_UNSPECIFIED) {
        /* config, rxq, txq, and one kick per vhost queue */
        vpci_dev->nvectors = 3 + vvu->max_vhost_queues;
    }
    vpci_dev->msix_bar_idx = 1;
    vpci_dev->modern_mem_bar_idx = 4;
    virtio_pci_force_virtio_1(vpci_dev);

    vvu->transport = (VirtIOVhostUserTransport) {
        .opaque = vpci_dev,
        .nr_vectors = vvu_pci_nr_vectors,
        .vector_use = vvu_pci_vector_use,
        .vector_unuse = vvu_pci_vector_unuse,
        .notify = vvu_pci_notify,
    };
    if (!qdev_realize(DEVICE(vvu), BUS(&vpci_dev->bus), errp)) {
        return;
    }
    /* virtio-pci installed its handler when the device was plugged. */
    dev->parent_config_write = vpci_dev->pci_dev.config_write;
    vpci_dev->pci_dev.config_write = vvu_pci_config_write;

    pci_register_bar(&vpci_dev->pci_dev, VIRTIO_VHOST_USER_AUX_BAR,
                     PCI_BASE_ADDRESS_SPACE_MEMORY, &vvu->aux);
    doorbell.cap.offset = cpu_to_le32(0);
    doorbell.cap.length = cpu_to_le32(vvu->doorbells_size);
    vvu_pci_add_cap(vpci_dev, &doorbell.cap, &local_err);
    if (local_err) {
        error_propagate(errp, local_err);
        return;
    }
    notification.offset = cpu_to_le32(vvu->notification_offset);
    vvu_pci_add_cap(vpci_dev, &notification, &local_err);
    if (local_err) {
        error_propagate(errp, local_err);
        return;
    }

    pci_register_bar(&vpci_dev->pci_dev, VIRTIO_VHOST_USER_SHM_BAR,
                     PCI_BASE_ADDRESS_SPACE_MEMORY |
                     PCI_BASE_ADDRESS_MEM_PREFETCH |
                     PCI_BASE_ADDRESS_MEM_TYPE_64, &vvu->shm);
    virtio_pci_add_shm_cap(vpci_dev, VIRTIO_VHOST_USER_SHM_BAR, 0,
                           vvu->shm_size, VIRTIO_VHOST_USER_SHM_ID_MEMORY);
}

static const Property virtio_vhost_user_pci_properties[] = {
    DEFINE_PROP_UINT32("vectors", VirtIOPCIProxy, nvectors,
                       DEV_NVECTORS_UNSPECIFIED),
};

static void virtio_vhost_user_pci_class_init(ObjectClass *klass, void *data)
{
    DeviceClass *dc = DEVICE_CLASS(klass);
    VirtioPCIClass *k = VIRTIO_PCI_CLASS(klass);
    PCIDeviceClass *pcidev_k = PCI_DEVICE_CLASS(klass);

    k->realize = vvu_pci_realize;
    set_bit(DEVICE_CATEGORY_MISC, dc->categories);
    device_class_set_props(dc, virtio_vhost_user_pci_properties);
    dc->hotpluggable = false;
    pcidev_k->vendor_id = PCI_VENDOR_ID_REDHAT_QUMRANET;
    pcidev_k->device_id = PCI_DEVICE_ID_VIRTIO_10_BASE + VIRTIO_ID_VHOST_USER;
    pcidev_k->revision = 1;
    pcidev_k->class_id = PCI_CLASS_OTHERS;
}

static void virtio_vhost_user_pci_instance_init(Object *obj)
{
    VirtIOVhostUserPCI *dev = VIRTIO_VHOST_USER_PCI(obj);

    virtio_instance_init_common(obj, &dev->vdev, sizeof(dev->vdev),
                                TYPE_VIRTIO_VHOST_USER);
}

static const VirtioPCIDeviceTypeInfo virtio_vhost_user_pci_info = {
    .base_name = TYPE_VIRTIO_VHOST_USER_PCI,
    .generic_name = "virtio-vhost-user-pci",
    .instance_size = sizeof(VirtIOVhostUserPCI),
    .instance_init = virtio_vhost_user_pci_instance_init,
    .class_init = virtio_vhost_user_pci_class_init,
};

static void virtio_vhost_user_pci_register(void)
{
    virtio_pci_types_register(&virtio_vhost_user_pci_info);
}

type_init(virtio_vhost_user_pci_register)
