//! A randomized qtest fuzzer for the virtio-vhost-user-pci device model (`qemu-device/`),
//! driven from the hostile appliance guest's side while a fake front-end keeps a live
//! vhost-user session on the device's chardev (issue 19).
//!
//! QEMU runs the patched device under AddressSanitizer and UBSan (`qemu-device/build.sh
//! --asan`) with `-M q35 -accel qtest`: no CPU runs, and every guest access is a qtest
//! command on a unix socket ([`qtest`]). The fuzzer knows the device's layout
//! (`design/VVU-SPEC.md`: capabilities 6/7/8, BARs 0/1/2/4), so it can bring the device up as
//! a driver does, set up rxq/txq in guest RAM, and from there do anything a hostile driver
//! can: PCI config and BAR accesses of every width, virtio common/notify/ISR/device-config
//! writes, status and reset loops, descriptor chains of any shape, doorbell and
//! notification stores, MSI-X programming (including vectors aimed at the device's own BARs).
//! The front-end ([`frontend`]) sends valid and malformed vhost-user messages with real file
//! descriptors (memfds mapped into the shared-memory BAR, eventfds wired to doorbells and
//! MSI-X, a backend channel), and disconnects and reconnects in the middle.
//!
//! After every sequence of operations QEMU must still answer qtest, and its stderr must hold
//! no sanitizer report. Oracles check what a crash check cannot see: memory the guest writes
//! through the BAR is the front-end's memory, doorbell stores reach the front-end's call
//! eventfd, a kick reaches the MSI-X vector the driver chose.
//!
//! Every action (qtest command or front-end step) is recorded as one line of a trace
//! ([`trace`]); a failing run's trace replays the failure and can be minimized. Traces of
//! fixed crashes are kept in `qemu-device/tests/regressions/`.

pub mod device;
pub mod frontend;
pub mod fuzzer;
pub mod guest;
pub mod messages;
pub mod oracle;
pub mod qtest;
pub mod run;
pub mod trace;
