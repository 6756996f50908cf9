//! QEMU TCG defects that fail a guest's boot now and then on this 2-core machine under
//! load, told apart from everything else by their exact messages, and the one retry a boot
//! that met one gets. KVM guests do not have them; a defect after boot still fails a test.

use crate::vm::{Accel, Vm};

/// Which QEMU booted the guest: some defects are retried only in stock QEMU, where none
/// of our code runs (our device model changes the memory map the softmmu defect is about).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuBuild {
    /// Debian's `qemu-system-x86_64` (the consumers).
    Stock,
    /// The build with our virtio-vhost-user device (the appliance VM, `vvu_device`).
    Patched,
}

/// The kernel's RCU stall report of a vCPU whose timer stopped firing: the stall header
/// and the grace-period kthread's missed timer wakeup, both seen in a CI run where the
/// consumer's CPU 1 stayed idle from early boot on. A vCPU blocked in QEMU (a back-end
/// that never answers) shows the header without the timer line, and is not retried.
const RCU_TIMER_STALL: [&str; 2] = [
    "detected stalls on CPUs/tasks",
    "kthread timer wakeup didn't happen",
];

/// The softmmu's assertion that a TLB entry's section index fits the vCPU's memory map:
/// seen once (in a hang hunt) when a stock consumer QEMU aborted while its guest booted.
const IOTLB_STALE_SECTION: &str =
    "iotlb_to_section: Assertion `section_index < d->map.sections_nb' failed";

/// The QEMU TCG defect a failed boot's log shows, if any, as a phrase for the log.
pub fn tcg_defect(log: &str, qemu: QemuBuild) -> Option<&'static str> {
    if RCU_TIMER_STALL.iter().all(|line| log.contains(line)) {
        Some("a vCPU stopped taking timer interrupts (the kernel reports an RCU stall)")
    } else if qemu == QemuBuild::Stock && log.contains(IOTLB_STALE_SECTION) {
        Some("QEMU aborted in the softmmu: a TLB entry outlived its memory map")
    } else {
        None
    }
}

/// A TCG boot that failed on a known QEMU TCG defect ([`tcg_defect`]) is tried once more
/// with `again`, saying so; any other outcome is returned as it is.
pub fn retry_tcg_defect(
    accel: Accel,
    qemu: QemuBuild,
    first: Result<Vm, String>,
    again: impl FnOnce() -> Result<Vm, String>,
) -> Result<Vm, String> {
    let defect = match &first {
        Err(log) if accel == Accel::Tcg => tcg_defect(log, qemu),
        _ => None,
    };
    match (first, defect) {
        (Err(log), Some(defect)) => {
            let tail = log.char_indices().rev().nth(3000).map_or(0, |(at, _)| at);
            eprintln!(
                "vm: the TCG guest's boot failed on a QEMU TCG defect ({defect}): booting it \
                 once more. The failed boot:\n{}",
                &log[tail..]
            );
            again()
        }
        (other, _) => other,
    }
}

#[cfg(test)]
mod tests {
    use super::{retry_tcg_defect, tcg_defect, QemuBuild};
    use crate::vm::Accel;

    /// From a CI run: the consumer guest's CPU 1 never woke after going idle at boot.
    const STALLED: &str = "[   23.265023] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
        [   23.266252] rcu: \t1-...!: (0 ticks this GP) idle=c6c8/0/0x0 softirq=9/9 fqs=0\n\
        [   23.268878] rcu: rcu_preempt kthread timer wakeup didn't happen for 5251 jiffies!";

    /// From a hang hunt: the stock consumer QEMU aborted while the guest booted.
    const ABORTED: &str = "qemu-system-x86_64: system/physmem.c:2678: iotlb_to_section: \
        Assertion `section_index < d->map.sections_nb' failed.";

    #[test]
    fn the_two_defects_are_told_by_their_exact_messages() {
        let stall = tcg_defect(STALLED, QemuBuild::Patched);
        assert!(stall.is_some_and(|d| d.contains("RCU stall")));
        let abort = tcg_defect(ABORTED, QemuBuild::Stock);
        assert!(abort.is_some_and(|d| d.contains("softmmu")));
        // Our device model changes the memory map: its abort is ours to find.
        assert_eq!(tcg_defect(ABORTED, QemuBuild::Patched), None);
        for other in [
            // A vCPU blocked in QEMU: the stall header without the missed timer wakeup.
            "[   30.1] rcu: INFO: rcu_preempt detected stalls on CPUs/tasks:\n\
             [   30.2] rcu: \t0-...0: (1 GPs behind) idle=1b4/1/0x4000000000000000",
            "[    0.000000] rcu: Preemptible hierarchical RCU implementation.",
            "qemu-system-x86_64: ../system/physmem.c:2681: iotlb_to_section: Assertion `ret->mr' failed.",
            "qemu-system-x86_64: ../hw/virtio/vhost.c:1300: vhost_virtqueue_start: Assertion `r' failed.",
        ] {
            assert_eq!(tcg_defect(other, QemuBuild::Stock), None, "{other}");
        }
    }

    #[test]
    fn only_a_tcg_boot_that_met_a_defect_is_tried_again() {
        let unreachable = || -> Result<crate::vm::Vm, String> { panic!("booted again") };
        // No defect, or not TCG: the first outcome as it was.
        let other = retry_tcg_defect(
            Accel::Tcg,
            QemuBuild::Stock,
            Err("kernel panic".into()),
            unreachable,
        );
        assert_eq!(other.err().as_deref(), Some("kernel panic"));
        let kvm = retry_tcg_defect(
            Accel::Kvm,
            QemuBuild::Stock,
            Err(STALLED.into()),
            unreachable,
        );
        assert_eq!(kvm.err().as_deref(), Some(STALLED));
        // A defect: the second boot's outcome, whatever it is.
        let again = retry_tcg_defect(Accel::Tcg, QemuBuild::Stock, Err(ABORTED.into()), || {
            Err("second boot".into())
        });
        assert_eq!(again.err().as_deref(), Some("second boot"));
    }
}
