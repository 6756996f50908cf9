//! `vvu-probe SYSFS_PATH [SECONDS]`: the test program of the virtio-vhost-user device,
//! run inside an appliance VM by `tests/vvu_device.rs`. It brings up a device bound to
//! vfio-pci, sets BACKEND_UP and answers a frontend's first requests (GET_FEATURES,
//! GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS), printing every message it
//! sees. For each SET_VRING_CALL it wires a fresh eventfd to that vring's call doorbell and
//! signals it once, so the frontend's call eventfd fires with no user-space hop in the
//! appliance VM, and it reports kicks arriving on the vhost queues' MSI-X vectors. For
//! SET_MEM_TABLE and ADD_MEM_REG it maps each frontend region out of the shared-memory BAR
//! and prints its checksum and the copy bandwidth from the mapping. It acknowledges any
//! other request that asks for a reply, and when a frontend hands over a backend channel
//! (SET_BACKEND_REQ_FD) it sends a backend request on it (CONFIG_CHANGE_MSG, asking for a
//! reply). SET_VRING_ENABLE makes it put a malformed message on txq: the device must enter
//! DEVICE_NEEDS_RESET, and the probe then resets it and brings it up again, as the
//! appliance's bridge does.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{BackendReq, FrontendReq, VhostUserHeaderFlag};
use vhost::vhost_user::VhostUserProtocolFeatures;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vvu_transport::driver::{VvuDriver, FRONTEND_UP, HEADER_SIZE};
use vvu_transport::vfio::{VfioPci, DMA_IOVA};

const GET_FEATURES: u32 = FrontendReq::GET_FEATURES as u32;
const GET_PROTOCOL_FEATURES: u32 = FrontendReq::GET_PROTOCOL_FEATURES as u32;
const GET_QUEUE_NUM: u32 = FrontendReq::GET_QUEUE_NUM as u32;
const GET_MAX_MEM_SLOTS: u32 = FrontendReq::GET_MAX_MEM_SLOTS as u32;
const SET_VRING_CALL: u32 = FrontendReq::SET_VRING_CALL as u32;
const SET_MEM_TABLE: u32 = FrontendReq::SET_MEM_TABLE as u32;
const ADD_MEM_REG: u32 = FrontendReq::ADD_MEM_REG as u32;
const SET_BACKEND_REQ_FD: u32 = FrontendReq::SET_BACKEND_REQ_FD as u32;
const SET_VRING_ENABLE: u32 = FrontendReq::SET_VRING_ENABLE as u32;
/// The backend request the probe sends on a backend channel.
const BACKEND_CONFIG_CHANGE_MSG: u32 = BackendReq::CONFIG_CHANGE_MSG as u32;
/// Header flags: protocol version 1, reply, reply wanted.
const VERSION: u32 = 1;
const REPLY: u32 = VhostUserHeaderFlag::REPLY.bits();
const NEED_REPLY: u32 = VhostUserHeaderFlag::NEED_REPLY.bits();
/// Size of one `VhostUserMemoryRegion` in SET_MEM_TABLE (after its 8-byte count).
const MEM_REGION_SIZE: usize = 32;
/// Vring index bits of a SET_VRING_* u64 payload.
const VRING_INDEX_MASK: u64 = 0xff;
/// VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES.
const FEATURES: u64 = (1 << 32) | (1 << 30);
/// What the probe speaks.
const PROTOCOL_FEATURES: u64 = VhostUserProtocolFeatures::MQ
    .union(VhostUserProtocolFeatures::REPLY_ACK)
    .union(VhostUserProtocolFeatures::BACKEND_REQ)
    .union(VhostUserProtocolFeatures::CONFIG)
    .union(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS)
    .bits();
/// Memory slots the probe claims (the device caps the reply at its own limit).
const MAX_MEM_SLOTS: u64 = 509;

fn reply(request: u32, value: u64) -> Vec<u8> {
    let mut m = request.to_le_bytes().to_vec();
    m.extend_from_slice(&(VERSION | REPLY).to_le_bytes());
    m.extend_from_slice(&8u32.to_le_bytes());
    m.extend_from_slice(&value.to_le_bytes());
    m
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// FNV-1a, 64-bit: a checksum the test recomputes on the host.
fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Maps each region of a SET_MEM_TABLE payload (or the one region of an ADD_MEM_REG
/// payload, which has the same layout with a count of 1) out of the shared-memory BAR (at
/// the `mmap_offset` the device rewrote), copies it out, and prints its checksum and how
/// fast the copy from the BAR mapping went.
fn read_regions(driver: &VvuDriver<VfioPci>, request: u32, payload: &[u8]) -> Result<(), String> {
    let count = if request == ADD_MEM_REG {
        1
    } else {
        payload
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or("SET_MEM_TABLE without a region count")?
    };
    let what = if request == ADD_MEM_REG {
        "added region"
    } else {
        "region"
    };
    let shm = driver.shared_memory();
    for i in 0..count {
        let at = 8 + i * MEM_REGION_SIZE;
        let region = payload
            .get(at..at + MEM_REGION_SIZE)
            .ok_or("SET_MEM_TABLE shorter than its region count")?;
        let (gpa, size, offset) = (le64(region, 0), le64(region, 8), le64(region, 24));
        if offset.checked_add(size).is_none_or(|end| end > shm.length) {
            return Err(format!("region {i} lies outside the shared-memory BAR"));
        }
        let len = usize::try_from(size).map_err(|e| e.to_string())?;
        let mapping = driver
            .pci()
            .map_bar(shm.bar, shm.offset + offset, len)
            .map_err(|e| format!("mapping region {i}: {e}"))?;
        let mut copy = vec![0u8; len];
        let start = Instant::now();
        mapping
            .read(0, &mut copy)
            .ok_or("region larger than its mapping")?;
        let elapsed = start.elapsed();
        let mib = size as f64 / f64::from(1u32 << 20);
        println!(
            "vvu-probe: {what} {i} gpa={gpa:#x} size={size} bar_offset={offset:#x} fnv1a={:016x} copied {mib:.1} MiB from the BAR in {:.2} ms ({:.0} MiB/s)",
            fnv1a(&copy),
            elapsed.as_secs_f64() * 1e3,
            mib / elapsed.as_secs_f64().max(1e-9)
        );
    }
    Ok(())
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let sysfs = PathBuf::from(args.next().ok_or("usage: vvu-probe SYSFS_PATH [SECONDS]")?);
    let seconds: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(60);
    let pci = VfioPci::open(&sysfs).map_err(|e| format!("vfio: {e}"))?;
    let mut driver = VvuDriver::new(pci, 64, GuestAddress(DMA_IOVA)).map_err(|e| e.to_string())?;
    println!(
        "vvu-probe: device up, max_vhost_queues={} kick0_vector={}",
        driver.max_vhost_queues(),
        driver.kick_vector(0)
    );
    driver.set_backend_up(true).map_err(|e| e.to_string())?;
    println!("vvu-probe: BACKEND_UP");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut frontend_seen = false;
    // Call eventfds wired to doorbells (kept so they stay open as long as their wiring).
    let mut calls = Vec::new();
    while Instant::now() < deadline {
        let mut pfd = [
            libc::pollfd {
                fd: driver.rx_event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: driver.config_event().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds for the duration of the call.
        unsafe { libc::poll(pfd.as_mut_ptr(), 2, 200) };
        if pfd[1].revents != 0 {
            let _ = driver.config_event().read();
            if driver.needs_reset().map_err(|e| e.to_string())? {
                println!("vvu-probe: device needs a reset");
                calls.clear();
                drop(driver);
                let pci = VfioPci::open(&sysfs).map_err(|e| format!("vfio: {e}"))?;
                driver =
                    VvuDriver::new(pci, 64, GuestAddress(DMA_IOVA)).map_err(|e| e.to_string())?;
                driver.set_backend_up(true).map_err(|e| e.to_string())?;
                frontend_seen = false;
                println!("vvu-probe: device up again");
                continue;
            }
            let status = driver.device_status().map_err(|e| e.to_string())?;
            let up = status & FRONTEND_UP != 0;
            if up != frontend_seen {
                println!(
                    "vvu-probe: frontend {}",
                    if up { "connected" } else { "gone" }
                );
                frontend_seen = up;
            }
            if !up {
                // Acknowledge the end of the session: the device takes the next frontend.
                driver.set_backend_up(true).map_err(|e| e.to_string())?;
            }
        }
        for vring in 0..driver.max_vhost_queues() as usize {
            if let Some(kick) = driver.kick_event(vring) {
                if kick.read().is_ok() {
                    println!("vvu-probe: kick of vring {vring} received");
                }
            }
        }
        let _ = driver.rx_event().read();
        while let Some(msg) = driver.recv().map_err(|e| e.to_string())? {
            let request = u32::from_le_bytes([msg[0], msg[1], msg[2], msg[3]]);
            let flags = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
            println!(
                "vvu-probe: message request={request} flags={flags:#x} size={}",
                msg.len() - HEADER_SIZE
            );
            if request == SET_MEM_TABLE || request == ADD_MEM_REG {
                if let Err(e) = read_regions(&driver, request, &msg[HEADER_SIZE..]) {
                    println!("vvu-probe: {e}");
                }
            }
            if request == SET_VRING_CALL && msg.len() >= HEADER_SIZE + 8 {
                let vring = (le64(&msg, HEADER_SIZE) & VRING_INDEX_MASK) as u32;
                let call = EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?;
                driver
                    .wire_doorbell(vring, Some(&call))
                    .map_err(|e| format!("wiring the call doorbell of vring {vring}: {e}"))?;
                call.write(1).map_err(|e| e.to_string())?;
                println!("vvu-probe: call of vring {vring} signalled through the kernel");
                calls.push(call);
            }
            if flags & REPLY != 0 {
                // A frontend's reply on the backend channel; printed above.
                continue;
            }
            let answer = match request {
                GET_FEATURES => Some(reply(request, FEATURES)),
                GET_PROTOCOL_FEATURES => Some(reply(request, PROTOCOL_FEATURES)),
                GET_QUEUE_NUM => Some(reply(request, 1)),
                GET_MAX_MEM_SLOTS => Some(reply(request, MAX_MEM_SLOTS)),
                _ if flags & NEED_REPLY != 0 => Some(reply(request, 0)),
                _ => None,
            };
            if let Some(answer) = answer {
                driver.send(&answer).map_err(|e| e.to_string())?;
                println!("vvu-probe: replied to request={request}");
            }
            if request == SET_VRING_ENABLE {
                // Shorter than a message header: a driver error.
                driver.send(&[0u8; 4]).map_err(|e| e.to_string())?;
                println!("vvu-probe: sent a malformed message");
            }
            if request == SET_BACKEND_REQ_FD {
                let mut m = BACKEND_CONFIG_CHANGE_MSG.to_le_bytes().to_vec();
                m.extend_from_slice(&(VERSION | NEED_REPLY).to_le_bytes());
                m.extend_from_slice(&0u32.to_le_bytes());
                driver.send(&m).map_err(|e| e.to_string())?;
                println!("vvu-probe: sent backend request={BACKEND_CONFIG_CHANGE_MSG}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vvu-probe: {e}");
            ExitCode::FAILURE
        }
    }
}
