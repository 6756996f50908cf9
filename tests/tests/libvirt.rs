//! libvirt as fleets run it: bookworm's libvirt-daemon-system and QEMU (TCG) next to the
//! packaged daemon under systemd, in a systemd-nspawn container. A consumer domain with a
//! `<disk type='vhostuser'>` served by the daemon (guest RAM shared, memfd) boots the
//! project's consumer image and runs the mkfs/fsck/fio-verify checks on it; `virsh
//! attach-device` hotplugs a second vhostuser disk, which the guest then verifies with fio.
//! A vhost-user-scsi export, which libvirt has no element for, is attached through libvirt's
//! QEMU command-line passthrough as the README shows, and verified with fio too.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use appliance_tests::console::Console;
use appliance_tests::nspawn::{libvirt_rootfs, Container, Net};
use appliance_tests::vm::{filesystem_and_fio_script, ConsumerImage};

const UNIT: &str = "vhost-appliance.service";
const TIMEOUT: Duration = Duration::from_secs(30);
/// A guest under TCG, nested in nothing faster.
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);

/// Two blk exports; QEMU runs as libvirt-qemu, a member of kvm, hence the group.
const EXPORTS: &str = r#"state_dir: /var/lib/vhost-appliance
socket_permissions:
  mode: "0660"
  group: kvm
exports:
  - name: disk1
    type: blk
    socket: /run/vhost-appliance/disk1.sock
    path: /var/lib/vhost-appliance/disk1.raw
    create: { size: 128M }
    num_queues: 2
    serial: libvirt-disk1
  - name: disk2
    type: blk
    socket: /run/vhost-appliance/disk2.sock
    path: /var/lib/vhost-appliance/disk2.raw
    create: { size: 64M }
    num_queues: 1
    serial: libvirt-disk2
  - name: db
    type: scsi
    socket: /run/vhost-appliance/db.sock
    num_queues: 1
    luns:
      - path: /var/lib/vhost-appliance/db.raw
        create: { size: 64M }
"#;

/// The consumer: direct kernel boot of the consumer image, serial port on a unix socket (the
/// test's command channel), guest RAM from a shared memfd as vhost-user needs, free PCIe
/// root ports for hotplug, disk1 as a vhostuser disk and the scsi export through QEMU
/// command-line passthrough.
const DOMAIN: &str = r#"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>consumer</name>
  <memory unit='MiB'>512</memory>
  <vcpu>2</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>/var/lib/libvirt/images/consumer-vmlinuz</kernel>
    <initrd>/var/lib/libvirt/images/consumer-initrd.img</initrd>
    <cmdline>console=ttyS0 loglevel=4 panic=-1</cmdline>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='vhostuser' device='disk'>
      <driver name='qemu' type='raw' queues='2'/>
      <source type='unix' path='/run/vhost-appliance/disk1.sock'>
        <reconnect enabled='yes' timeout='10'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='1' model='pcie-root-port'/>
    <controller type='pci' index='2' model='pcie-root-port'/>
    <controller type='pci' index='3' model='pcie-root-port'/>
    <serial type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/consumer.serial'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-chardev'/>
    <qemu:arg value='socket,id=db,path=/run/vhost-appliance/db.sock'/>
    <qemu:arg value='-device'/>
    <qemu:arg value='vhost-user-scsi-pci,id=db,chardev=db,num_queues=1,bus=pcie.0,addr=0x10'/>
  </qemu:commandline>
</domain>
"#;

/// The hotplugged disk.
const DISK2: &str = r#"<disk type='vhostuser' device='disk'>
  <driver name='qemu' type='raw' queues='1'/>
  <source type='unix' path='/run/vhost-appliance/disk2.sock'>
    <reconnect enabled='yes' timeout='10'/>
  </source>
  <target dev='vdb' bus='virtio'/>
</disk>
"#;

/// Writes `text` to `path` in the container.
fn write_file(container: &Container, path: &str, text: &str) {
    container.sh_ok(&format!("cat > {path} <<'EOF'\n{text}EOF"));
}

#[test]
#[ignore = "full tier (tests/run.sh): libvirt and a TCG guest in a systemd-nspawn bookworm container"]
fn libvirt_domain_with_vhostuser_disks_served_by_the_packaged_daemon() {
    let image = ConsumerImage::get();
    let container = Container::boot_and_install(
        libvirt_rootfs(),
        &[(&image.dir, "/mnt/image")],
        Net::Private,
    );

    // The daemon serves the two exports (the packaged config, edited, then reloaded).
    write_file(&container, "/etc/vhost-appliance/exports.yaml", EXPORTS);
    container.sh_ok(&format!("systemctl reload {UNIT}"));
    container.wait_until(
        "test -S /run/vhost-appliance/disk1.sock && test -S /run/vhost-appliance/disk2.sock \
         && test -S /run/vhost-appliance/db.sock",
        "the exports' sockets",
        UNIT,
        TIMEOUT,
    );
    assert_eq!(
        container
            .sh_ok("stat -c %G /run/vhost-appliance/disk1.sock")
            .trim(),
        "kvm"
    );

    // systemd-nspawn mounts the cgroup v1 controllers read-only in the container (this host
    // runs cgroup v1), where libvirtd would place QEMU: without controllers it does not try.
    // A real host needs none of this.
    container.sh_ok(
        "echo 'cgroup_controllers = [ ]' >> /etc/libvirt/qemu.conf && systemctl restart libvirtd",
    );

    // The domain: defined and started through libvirtd.
    container.sh_ok(
        "cp /mnt/image/vmlinuz /var/lib/libvirt/images/consumer-vmlinuz && \
         cp /mnt/image/initrd.img /var/lib/libvirt/images/consumer-initrd.img",
    );
    write_file(&container, "/root/consumer.xml", DOMAIN);
    write_file(&container, "/root/disk2.xml", DISK2);
    container.sh_ok("virsh -c qemu:///system define /root/consumer.xml");
    let start = container.sh("virsh -c qemu:///system start consumer");
    assert!(
        start.status.success(),
        "virsh start:\n{}{}\n--- qemu log ---\n{}\n--- libvirtd ---\n{}",
        String::from_utf8_lossy(&start.stdout),
        String::from_utf8_lossy(&start.stderr),
        container
            .sh("cat /var/log/libvirt/qemu/consumer.log")
            .stdout
            .escape_ascii(),
        container.journal("libvirtd.service")
    );

    // What libvirt made of it: a vhost-user-blk device on a shared memfd backend.
    let qemu_log = container.host_path("/var/log/libvirt/qemu/consumer.log");
    let command_line = std::fs::read_to_string(&qemu_log).unwrap();
    for needle in [
        "vhost-user-blk-pci",
        "memory-backend-memfd",
        "\"share\":true",
    ] {
        assert!(
            command_line.contains(needle),
            "{needle} not in:\n{command_line}"
        );
    }

    // The guest, driven over its serial port.
    let serial = container.host_path("/var/lib/libvirt/qemu/consumer.serial");
    let deadline = Instant::now() + TIMEOUT;
    let mut console = loop {
        match Console::connect(&serial, &qemu_log) {
            Ok(console) => break console,
            Err(e) => {
                assert!(Instant::now() < deadline, "{e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    let booted = Instant::now();
    assert!(
        console.wait_ready(GUEST_TIMEOUT),
        "the guest did not boot:\n{}\n--- qemu ---\n{}",
        console.transcript(),
        console.qemu_log()
    );
    eprintln!(
        "libvirt: guest ready after {:.1}s",
        booted.elapsed().as_secs_f64()
    );
    let dev = console.wait_for_blk("libvirt-disk1", TIMEOUT);
    let out = console.run_ok(&filesystem_and_fio_script(&dev), GUEST_TIMEOUT);
    assert!(out.contains("GUEST-CHECKS-PASSED"), "{out}");

    // Hotplug through libvirt: the second export appears in the guest and verifies.
    container.sh_ok("virsh -c qemu:///system attach-device consumer /root/disk2.xml --live");
    let dev2 = console.wait_for_blk("libvirt-disk2", TIMEOUT);
    assert_ne!(dev, dev2);
    let out = console.run_ok(
        &format!(
            "fio --name=verify --filename=/dev/{dev2} --ioengine=io_uring --iodepth=8 --direct=1 \
             --rw=randwrite --bs=4k --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 \
             --randrepeat=0 --output-format=terse --minimal && echo HOTPLUG-VERIFIED"
        ),
        GUEST_TIMEOUT,
    );
    assert!(out.contains("HOTPLUG-VERIFIED"), "{out}");
    let xml = container.sh_ok("virsh -c qemu:///system dumpxml consumer");
    assert_eq!(xml.matches("<disk type='vhostuser'").count(), 2, "{xml}");

    // The scsi export's LUN, through the passthrough.
    let out = console.run_ok(
        "set -e; i=0; while [ ! -e /sys/block/sda ] && [ $i -lt 100 ]; do sleep 0.2; i=$((i+1)); done; \
         grep -q VHOSTAPP /sys/block/sda/device/vendor; \
         fio --name=verify --filename=/dev/sda --ioengine=io_uring --iodepth=8 --direct=1 \
         --rw=randwrite --bs=4k --size=8M --verify=crc32c --verify_fatal=1 --do_verify=1 \
         --randrepeat=0 --output-format=terse --minimal && echo SCSI-VERIFIED",
        GUEST_TIMEOUT,
    );
    assert!(out.contains("SCSI-VERIFIED"), "{out}");

    // The three frontends were the daemon's, and it stops cleanly once the domain is gone.
    let journal = container.journal(UNIT);
    for export in ["disk1", "disk2", "db"] {
        assert!(
            journal.contains(&format!("frontend connected export=\"{export}\"")),
            "no frontend on {export}:\n{journal}"
        );
    }
    container.sh_ok("virsh -c qemu:///system destroy consumer");
    container.sh_ok(&format!("systemctl stop {UNIT}"));
    let props = container.sh_ok(&format!("systemctl show {UNIT} -p Result,ExecMainStatus"));
    assert_eq!(
        props,
        "Result=success\nExecMainStatus=0\n",
        "{}",
        container.journal(UNIT)
    );
}
