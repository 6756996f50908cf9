//! Oracles: checks that the device did the right thing, not only that QEMU survived. Each
//! starts a fresh session (so nothing queued earlier can interleave), sends one message, and
//! once the guest has it on rxq checks its effect end to end (`design/VVU-SPEC.md`):
//! - memory: ADD_MEM_REG is forwarded with `mmap_offset` rewritten to a 2 MiB-aligned BAR
//!   offset inside the shared-memory BAR, and there the guest reads what the front-end wrote
//!   into its memfd, and the front-end reads what the guest wrote;
//! - doorbell: after SET_VRING_CALL/ERR of vring i, a guest store of 1, 2 or 4 bytes to
//!   doorbell i (or N + i) signals the front-end's eventfd;
//! - kick: after SET_VRING_KICK of vring i and the guest mapping vector v to it through the
//!   notification structure, a front-end kick raises MSI-X vector v (its message lands in
//!   guest RAM).

use super::device::{common, status, Qt, BUF_BASE, BUF_END};
use super::fuzzer::Fuzzer;
use super::messages::{header, le64, msg, req, HDR, VERSION};
use super::qtest::Failure;
use super::trace::{Action, FdSpec};

/// The BAR alignment of a region (VVU-SPEC "Frontend memory in the shared-memory BAR").
const REGION_ALIGN: u64 = 2 << 20;

impl Fuzzer {
    /// A fresh, live session: the device up, a new front-end connection taken on
    /// (FRONTEND_UP). False if it could not be had (counted as skipped).
    pub fn fresh_session(&mut self) -> Result<bool, Failure> {
        // Everything the check relies on is set up again here, so a minimized trace can
        // keep this suffix whole and drop what came before: the BARs placed, memory and
        // bus mastering on, every MSI-X vector aimed at RAM (a vector aimed at the status
        // register resets the device when it fires, which a hostile driver may do, but
        // which would stop the check).
        self.act(Action::OracleStart)?;
        self.layout_dirty = false;
        let mut layout = self.layout.clone();
        layout.place(self)?;
        self.msix_setup()?;
        let st = self.read(self.layout.common + common::STATUS, 1)? as u8;
        if !self.up || st & status::DRIVER_OK == 0 || st & status::NEEDS_RESET != 0 {
            self.bring_up(true)?;
        }
        self.act(Action::Connect)?;
        self.act(Action::Settle)?;
        for _ in 0..3 {
            let cfg = self.read(self.layout.device_cfg, 4)?;
            if cfg & 3 == 3 {
                // What the previous session left on rxq is taken now, so the message the
                // oracle waits for cannot be confused with an older one.
                self.handle_rx()?;
                return Ok(true);
            }
            // BACKEND_UP (again): takes the connection, or acknowledges the last one's end.
            self.write(self.layout.device_cfg, 4, 1)?;
            self.act(Action::Settle)?;
        }
        self.stats.oracle_skipped += 1;
        Ok(false)
    }

    /// Sends one message and waits for the guest to receive it (a message whose first
    /// `key.len()` payload bytes are `key`); None if it never arrives.
    pub fn deliver(
        &mut self,
        bytes: Vec<u8>,
        fds: Vec<FdSpec>,
        key: &[u8],
    ) -> Result<Option<Vec<u8>>, Failure> {
        let (request, _, _) = header(&bytes);
        // Two buffers outstanding (more could overrun the ring, which the device must
        // refuse: a driver bug, not what this checks).
        for _ in 0..2 {
            // Bounded: a queue of one entry keeps one chain, however often it is posted.
            if self.queues[0].chains.len() >= 2 {
                break;
            }
            self.post_rx_page()?;
        }
        self.notify(0)?;
        self.send(bytes, fds)?;
        for _ in 0..10 {
            for (addr, m) in self.handle_rx()? {
                // Only a buffer the oracle's kind of driver would post: one in the buffer
                // area (a hostile one may overlap the rings, which the next post rewrites).
                if header(&m).0 == request
                    && (BUF_BASE..BUF_END).contains(&addr)
                    && m.get(HDR..HDR + key.len()) == Some(key)
                {
                    // Pins the delivery in the trace: the same header in the same buffer.
                    let read = format!("readq {addr:#x}");
                    self.act(Action::ExpectRead {
                        value: le64(&m, 0),
                        read,
                    })?;
                    return Ok(Some(m));
                }
            }
            self.act(Action::Settle)?;
        }
        self.stats.oracle_skipped += 1;
        Ok(None)
    }

    /// The memory oracle (see the module doc).
    pub fn oracle_memory(&mut self) -> Result<(), Failure> {
        if !self.fresh_session()? {
            return Ok(());
        }
        let size = [0x1000u64, 0x20_0000, 0x3_0000][self.rng.below(3) as usize];
        // A guest_phys_addr no other message uses: the key to find this one on rxq.
        let gpa = 0x7e57_0000_0000 + (self.rng.below(1 << 20) << 21);
        let (d, fd) = self.ctx.plain_region(gpa, size);
        let mut payload = vec![0u8; 8];
        payload.extend_from_slice(&d);
        let key: Vec<u8> = payload[..16].to_vec();
        let Some(m) = self.deliver(msg(req::ADD_MEM_REG, VERSION, &payload), vec![fd], &key)?
        else {
            return Ok(());
        };
        let (got_gpa, got_size, off) = (le64(&m, HDR + 8), le64(&m, HDR + 16), le64(&m, HDR + 32));
        if got_gpa != gpa || got_size != size {
            return Err(Failure::Oracle(format!(
                "ADD_MEM_REG forwarded as gpa {got_gpa:#x} size {got_size:#x}, sent {gpa:#x} {size:#x}"
            )));
        }
        if off & (REGION_ALIGN - 1) != 0
            || off
                .checked_add(size)
                .is_none_or(|end| end > self.layout.shm_len)
        {
            return Err(Failure::Oracle(format!(
                "region of {size:#x} bytes placed at BAR offset {off:#x} (shm {:#x})",
                self.layout.shm_len
            )));
        }
        let base = self.layout.shm + off;
        let at = self.rng.below(size / 8) * 8;
        let val = self.rng.next_u64();
        self.act(Action::Poke {
            id: fd.id,
            offset: at,
            data: val.to_le_bytes().to_vec(),
        })?;
        let read = format!("readq {:#x}", base + at);
        self.act(Action::ExpectRead { value: val, read }).map_err(|e| {
            context(e, format!("the front-end wrote at {at:#x} of its region, the guest read BAR offset {:#x}", off + at))
        })?;
        let at = self.rng.below(size / 8) * 8;
        let val = self.rng.next_u64();
        self.write(base + at, 8, val)?;
        let data = val.to_le_bytes().to_vec();
        self.act(Action::ExpectMemfd {
            id: fd.id,
            offset: at,
            data,
        })
        .map_err(|e| context(e, format!("the guest wrote BAR offset {:#x}", off + at)))?;
        self.stats.oracle_memory += 1;
        Ok(())
    }

    /// The doorbell oracle (see the module doc).
    pub fn oracle_doorbell(&mut self) -> Result<(), Failure> {
        if !self.fresh_session()? {
            return Ok(());
        }
        let n = u64::from(self.params.max_vhost_queues);
        let vring = self.rng.below(n);
        let err = self.rng.below(4) == 0;
        let (request, db) = if err {
            (req::SET_VRING_ERR, n + vring)
        } else {
            (req::SET_VRING_CALL, vring)
        };
        let fd = self.ctx.eventfd();
        let payload = vring.to_le_bytes();
        if self
            .deliver(msg(request, VERSION, &payload), vec![fd], &payload)?
            .is_none()
        {
            return Ok(());
        }
        // Nothing has signalled the new eventfd yet.
        let before = self.m.fe().take_signals(fd.id);
        let width = [1u8, 2, 2, 4][self.rng.below(4) as usize];
        // Aligned stores only: the memory core refuses unaligned ones before the device.
        let within = match width {
            1 => self.rng.below(4),
            2 => 2 * self.rng.below(2),
            _ => 0,
        };
        let addr = self.layout.doorbells + db * self.layout.doorbell_mult + within;
        let v = self.rng.next_u64();
        self.write(addr, width, v)?;
        let what = if err {
            "SET_VRING_ERR"
        } else {
            "SET_VRING_CALL"
        };
        if before != 0 {
            return Err(Failure::Oracle(format!(
                "eventfd of {what} signalled before any doorbell store"
            )));
        }
        self.act(Action::ExpectSignal(fd.id)).map_err(|e| {
            context(
                e,
                format!(
                    "doorbell {db} ({width}-byte store at {addr:#x}) after {what} of vring {vring}"
                ),
            )
        })?;
        self.stats.oracle_doorbell += 1;
        Ok(())
    }

    /// The kick oracle (see the module doc).
    pub fn oracle_kick(&mut self) -> Result<(), Failure> {
        let l = self.layout.clone();
        if l.msix_cap == 0 || l.msix_entries <= 3 || !self.fresh_session()? {
            return Ok(());
        }
        let n = u64::from(self.params.max_vhost_queues);
        let vring = self.rng.below(n);
        let fd = self.ctx.eventfd();
        let payload = vring.to_le_bytes();
        if self
            .deliver(
                msg(req::SET_VRING_KICK, VERSION, &payload),
                vec![fd],
                &payload,
            )?
            .is_none()
        {
            return Ok(());
        }
        // Vectors 0-2 are config, rxq and txq; a kick gets one of the others.
        let vector = 3 + self.rng.below(u64::from(l.msix_entries) - 3);
        let data = 0x5eed_0000 | self.rng.below(0x1_0000);
        let target = self.msi_base() + 4 * vector;
        self.cfg_write(0x04, 2, 0x6)?;
        self.cfg_write(l.msix_cap + 2, 2, 0x8000)?;
        let e = l.msix_table + 16 * vector;
        self.write(e, 4, target)?;
        self.write(e + 4, 4, 0)?;
        self.write(e + 8, 4, data)?;
        self.write(e + 12, 4, 0)?;
        self.write(l.notification, 2, vring)?;
        self.write(l.notification + 2, 2, vector)?;
        let read = format!("readw {:#x}", l.notification + 2);
        self.act(Action::ExpectRead {
            value: vector,
            read,
        })
        .map_err(|e| {
            context(
                e,
                format!("vring {vring} mapped to vector {vector} in the notification structure"),
            )
        })?;
        self.write(target, 4, 0)?;
        self.act(Action::Signal(fd.id))?;
        self.act(Action::Settle)?;
        let read = format!("readl {target:#x}");
        self.act(Action::ExpectRead { value: data, read }).map_err(|e| {
            context(e, format!("kick of vring {vring} mapped to MSI-X vector {vector} (message to {target:#x})"))
        })?;
        self.stats.oracle_kick += 1;
        Ok(())
    }
}

/// Adds what the oracle was checking to an oracle failure (after its first line, which
/// stays the signature).
fn context(e: Failure, what: String) -> Failure {
    match e {
        Failure::Oracle(detail) => Failure::Oracle(format!("{detail}\n{what}")),
        other => other,
    }
}
