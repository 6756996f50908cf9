//! Block-device command emulation for one logical unit (SPC-4 / SBC-3), modelled on
//! Linux LIO's `target_core_spc.c` / `target_core_sbc.c`.
//!
//! [`Lun::execute`] turns a CDB (plus, for parameter-list commands, the data-out bytes)
//! into an [`Outcome`]: data to return, a CHECK CONDITION with sense, a disk I/O request
//! for the transport to run, or REPORT LUNS for the transport to answer. Every length is
//! checked before use; nothing here panics on what an initiator sends.
//!
//! One table, `COMMANDS` (in the `commands` submodule, `scsi/emulation/commands.rs`), lists
//! every implemented command with its handler and its CDB usage map (SPC-4 6.35.3): dispatch
//! and REPORT SUPPORTED OPERATION CODES both read it, so what is reported is what runs, and a
//! bit the usage map shows as not evaluated changes nothing. The handlers live here.
//!
//! The capacity can grow while commands run ([`Lun::grow`], online resize): READ CAPACITY,
//! MODE SENSE's block descriptor and every range check read one atomic block count, and
//! growth establishes CAPACITY DATA HAS CHANGED (SPC-4 5.14, ASC 2Ah/ASCQ 09h) for the
//! transport to report as a unit attention ([`Lun::take_capacity_changed`]).

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::opcode::{
    INQUIRY, MODE_SELECT_10, MODE_SELECT_6, MODE_SENSE_10, READ_10, READ_12, REPORT_LUNS,
    REQUEST_SENSE, SYNCHRONIZE_CACHE_10, UNMAP, VERIFY_10, VERIFY_16, WRITE_10, WRITE_12, WRITE_16,
    WRITE_6, WRITE_SAME_10, WRITE_SAME_16,
};
use super::sense::Sense;
use commands::{Command, COMMANDS};

mod commands;
mod mode;

/// Largest transfer per READ/WRITE, in blocks (VPD B0 MAXIMUM TRANSFER LENGTH).
pub const MAX_TRANSFER_BLOCKS: u32 = 8192;
/// Most block descriptors per UNMAP (VPD B0 MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Most blocks per UNMAP, all descriptors together (VPD B0 MAXIMUM UNMAP LBA COUNT).
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// Length of the UNMAP parameter list header (SBC-4, UNMAP parameter list).
const UNMAP_HEADER: usize = 8;
/// Length of an UNMAP block descriptor (SBC-4, UNMAP block descriptor).
const UNMAP_DESCRIPTOR: usize = 16;
/// Most blocks per WRITE SAME.
/// (LIO reports the same limit.)
pub const MAX_WRITE_SAME_BLOCKS: u32 = 65535;
/// Largest parameter list accepted (UNMAP, MODE SELECT, WRITE SAME data).
pub const MAX_PARAMETER_LIST: usize = 64 * 1024;

const VENDOR: &[u8; 8] = b"VHOSTAPP";
const PRODUCT: &[u8; 16] = b"vhost-appliance ";
const REVISION: &[u8; 4] = b"0001";

/// Settings of a logical unit.
#[derive(Debug, Clone)]
pub struct LunSettings {
    /// Logical block size (512 or 4096).
    pub block_size: u32,
    /// Capacity in logical blocks at creation ([`Lun::blocks`] is the capacity now).
    pub blocks: u64,
    /// Refuse writes.
    pub readonly: bool,
    /// VPD 0x80 unit serial number (ASCII).
    pub serial: String,
    /// NAA 64-bit identifier for VPD 0x83 (NAA type 5 or 6 in the top nibble).
    pub wwn: u64,
    /// Report a spinning medium (VPD B1).
    pub rotational: bool,
    /// Volatile write cache enabled (MODE SENSE caching page WCE).
    pub write_cache: bool,
    /// UNMAP / WRITE SAME with UNMAP are implemented by the backing store.
    pub discard: bool,
    /// Unmapped blocks read back as zeroes (LBPRZ).
    pub unmapped_reads_zero: bool,
}

/// A disk I/O a command needs; LBAs and counts in logical blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IoRequest {
    /// Read into the data-in buffer.
    Read {
        /// First block.
        lba: u64,
        /// Block count.
        blocks: u32,
    },
    /// Write from the data-out buffer.
    Write {
        /// First block.
        lba: u64,
        /// Block count.
        blocks: u32,
        /// Force unit access: durable before completion.
        fua: bool,
    },
    /// Make written data durable.
    Flush,
    /// Deallocate these `(lba, blocks)` ranges.
    Unmap(Vec<(u64, u32)>),
    /// Zero a range, deallocating it if `unmap`.
    WriteZeroes {
        /// First block.
        lba: u64,
        /// Block count.
        blocks: u32,
        /// Deallocation allowed.
        unmap: bool,
    },
    /// Read a range and compare it with `expected` (VERIFY with BYTCHK).
    Compare {
        /// First block.
        lba: u64,
        /// Block count.
        blocks: u32,
        /// The data the medium must hold.
        expected: Vec<u8>,
    },
    /// Write one block's `pattern` to every block of a range.
    WriteSame {
        /// First block.
        lba: u64,
        /// Block count.
        blocks: u32,
        /// One logical block of data.
        pattern: Vec<u8>,
    },
}

/// What a command turned into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// GOOD, no data.
    Good,
    /// GOOD with data-in (already cut to the allocation length).
    Data(Vec<u8>),
    /// CHECK CONDITION.
    Check(Sense),
    /// Needs disk I/O; GOOD when it succeeds.
    Io(IoRequest),
    /// GOOD with REPORT LUNS data (SPC-4) for the whole target, which only the transport
    /// knows: it answers with [`report_luns`] on the same CDB.
    ReportLuns,
}

/// Largest data-out a VERIFY with BYTCHK may carry (the maximum transfer at 4 KiB blocks).
pub const MAX_VERIFY_BYTES: usize = MAX_TRANSFER_BLOCKS as usize * 4096;

/// How many data-out bytes a command wants gathered for [`Lun::execute`]: parameter lists,
/// and the data VERIFY compares. Bulk WRITE data is not gathered (it goes straight to disk).
pub fn data_out_to_gather(cdb: &[u8]) -> usize {
    match cdb.first() {
        Some(&(MODE_SELECT_6 | MODE_SELECT_10 | UNMAP | WRITE_SAME_10 | WRITE_SAME_16)) => {
            MAX_PARAMETER_LIST
        }
        Some(&(VERIFY_10 | VERIFY_16)) if cdb.get(1).is_some_and(|b| b & 0x06 != 0) => {
            MAX_VERIFY_BYTES
        }
        _ => 0,
    }
}

/// True for commands that do not report (or clear) a pending unit attention (SPC-4 5.14).
pub fn ignores_unit_attention(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(&(INQUIRY | REPORT_LUNS | REQUEST_SENSE)))
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// Length of a CDB by its group code (SPC-4 4.2.5.1); `None` for vendor/reserved groups.
pub fn cdb_length(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

fn truncated(mut data: Vec<u8>, alloc: usize) -> Outcome {
    data.truncate(alloc);
    Outcome::Data(data)
}

/// One emulated logical unit.
#[derive(Debug)]
pub struct Lun {
    settings: LunSettings,
    /// Capacity in logical blocks; starts at `settings.blocks` and only grows.
    blocks: AtomicU64,
    /// The capacity grew and no command has reported CAPACITY DATA HAS CHANGED yet.
    capacity_changed: AtomicBool,
}

impl Clone for Lun {
    fn clone(&self) -> Self {
        Lun {
            settings: self.settings.clone(),
            blocks: AtomicU64::new(self.blocks()),
            capacity_changed: AtomicBool::new(self.capacity_changed.load(Ordering::Acquire)),
        }
    }
}

/// The command timeouts descriptor (SPC-4 6.35.4) REPORT SUPPORTED OPERATION CODES returns
/// when RCTD is set: DESCRIPTOR LENGTH 0Ah, and zero nominal and recommended timeouts, which
/// indicate no timeout (none is known ahead: commands wait on the backing store).
const COMMAND_TIMEOUTS: [u8; 12] = [0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

impl Lun {
    /// A logical unit with `settings`.
    pub fn new(settings: LunSettings) -> Self {
        Lun {
            blocks: AtomicU64::new(settings.blocks),
            capacity_changed: AtomicBool::new(false),
            settings,
        }
    }

    /// Its settings (`blocks` as created; see [`Lun::blocks`]).
    pub fn settings(&self) -> &LunSettings {
        &self.settings
    }

    /// Capacity in logical blocks now.
    pub fn blocks(&self) -> u64 {
        self.blocks.load(Ordering::Acquire)
    }

    /// Grows the capacity to `blocks` logical blocks, for a backing store that has grown to
    /// at least that (online resize): commands see the new capacity from now on, and
    /// CAPACITY DATA HAS CHANGED is established (SPC-4 5.14, SBC-4 4.6). A count at or
    /// below the current one changes nothing: the capacity never shrinks under an
    /// initiator. Returns the previous capacity in blocks.
    pub fn grow(&self, blocks: u64) -> u64 {
        let before = self.blocks.fetch_max(blocks, Ordering::AcqRel);
        if blocks > before {
            self.capacity_changed.store(true, Ordering::Release);
        }
        before
    }

    /// Takes the pending CAPACITY DATA HAS CHANGED unit attention, if the capacity grew
    /// since it was last reported.
    pub fn take_capacity_changed(&self) -> Option<Sense> {
        self.capacity_changed
            .swap(false, Ordering::AcqRel)
            .then_some(Sense::CAPACITY_DATA_HAS_CHANGED)
    }

    /// Executes `cdb` (the transport's fixed-size CDB field); `parameters` are the gathered
    /// data-out bytes for parameter-list commands, empty otherwise.
    ///
    /// The command is looked up in the table of implemented commands: an unknown operation
    /// code gets INVALID COMMAND OPERATION CODE, an unknown service action of a known one
    /// INVALID FIELD IN CDB (SPC-4, reserved code values: only the OPERATION CODE field gets
    /// INVALID COMMAND OPERATION CODE); so does a CDB shorter than its command, or with NACA set
    /// in its CONTROL byte (ACA is not supported).
    pub fn execute(&self, cdb: &[u8], parameters: &[u8]) -> Outcome {
        let command = match self.command(cdb) {
            Ok(command) => command,
            Err(sense) => return Outcome::Check(sense),
        };
        let Some(cdb) = cdb.get(..command.usage.len()) else {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        };
        if cdb.last().is_some_and(|control| control & 0x04 != 0) {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        (command.run)(self, cdb, parameters)
    }

    /// The commands this logical unit implements.
    fn commands(&self) -> impl Iterator<Item = &'static Command> + '_ {
        COMMANDS.iter().filter(|c| (c.enabled)(&self.settings))
    }

    /// The command `cdb` names, by operation code and (where it has them) service action.
    fn command(&self, cdb: &[u8]) -> Result<&'static Command, Sense> {
        let opcode = cdb.first().ok_or(Sense::INVALID_OPCODE)?;
        let service_action = cdb.get(1).map(|b| b & 0x1f);
        let mut known_opcode = false;
        for command in self.commands().filter(|c| c.opcode == *opcode) {
            match command.service_action {
                None => return Ok(command),
                Some(sa) if Some(sa) == service_action => return Ok(command),
                Some(_) => known_opcode = true,
            }
        }
        Err(if known_opcode {
            Sense::INVALID_FIELD_IN_CDB
        } else {
            Sense::INVALID_OPCODE
        })
    }

    fn request_sense(&self, cdb: &[u8]) -> Outcome {
        // DESC (descriptor format) is not supported.
        if cdb[1] & 0x01 != 0 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        truncated(Sense::NO_SENSE.fixed().to_vec(), usize::from(cdb[4]))
    }

    /// Standard INQUIRY data for a connected disk (`qualifier_absent` for a missing LUN),
    /// with version descriptors claiming SAM-5, SPC-4 and SBC-3.
    pub fn standard_inquiry(absent: bool) -> Vec<u8> {
        let mut d = vec![0u8; 74];
        for (i, version) in [0x00a0u16, 0x0460, 0x04c0].iter().enumerate() {
            d[58 + 2 * i..60 + 2 * i].copy_from_slice(&version.to_be_bytes());
        }
        d[0] = if absent { 0x7f } else { 0x00 };
        d[2] = 0x06; // SPC-4
        d[3] = 0x12; // HISUP, response data format 2
        d[4] = (d.len() - 5) as u8;
        d[7] = 0x02; // CMDQUE
        d[8..16].copy_from_slice(VENDOR);
        d[16..32].copy_from_slice(PRODUCT);
        d[32..36].copy_from_slice(REVISION);
        d
    }

    fn inquiry(&self, cdb: &[u8]) -> Outcome {
        let evpd = cdb[1] & 0x01 != 0;
        let page = cdb[2];
        let alloc = usize::from(be16(cdb, 3));
        // CMDDT (obsolete; command support data) is not supported. The reserved bits are
        // ignored, as the CDB usage map says.
        if cdb[1] & 0x02 != 0 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        if !evpd {
            if page != 0 {
                return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
            }
            return truncated(Self::standard_inquiry(false), alloc);
        }
        let body = match page {
            0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
            0x80 => self.settings.serial.as_bytes().to_vec(),
            0x83 => self.device_identification(),
            0xb0 => self.block_limits(),
            0xb1 => self.block_device_characteristics(),
            0xb2 => self.logical_block_provisioning(),
            _ => return Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
        };
        let mut d = vec![0x00, page];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend_from_slice(&body);
        truncated(d, alloc)
    }

    fn device_identification(&self) -> Vec<u8> {
        let mut d = Vec::new();
        // NAA designator: binary code set, LUN association, type 3.
        d.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
        d.extend_from_slice(&self.settings.wwn.to_be_bytes());
        // T10 vendor ID designator: ASCII, LUN association, type 1.
        let mut t10 = VENDOR.to_vec();
        t10.extend_from_slice(self.settings.serial.as_bytes());
        d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
        d.extend_from_slice(&t10);
        d
    }

    fn block_limits(&self) -> Vec<u8> {
        let mut d = vec![0u8; 0x3c];
        // [0] WSNZ: a WRITE SAME of zero blocks is refused.
        d[0] = 0x01;
        d[2..4].copy_from_slice(&1u16.to_be_bytes()); // optimal transfer granularity
        d[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
        d[8..12].copy_from_slice(&(MAX_TRANSFER_BLOCKS / 4).to_be_bytes()); // optimal transfer
        if self.settings.discard && !self.settings.readonly {
            d[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
            d[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
            let granularity = (4096 / self.settings.block_size).max(1);
            d[24..28].copy_from_slice(&granularity.to_be_bytes());
        }
        d[32..40].copy_from_slice(&u64::from(MAX_WRITE_SAME_BLOCKS).to_be_bytes());
        d
    }

    fn block_device_characteristics(&self) -> Vec<u8> {
        let mut d = vec![0u8; 0x3c];
        let rate: u16 = if self.settings.rotational { 0 } else { 1 };
        d[0..2].copy_from_slice(&rate.to_be_bytes());
        d
    }

    fn logical_block_provisioning(&self) -> Vec<u8> {
        let mut d = vec![0u8; 4];
        if self.settings.discard && !self.settings.readonly {
            d[1] = 0x80 | 0x40 | 0x20; // LBPU, LBPWS, LBPWS10
            if self.settings.unmapped_reads_zero {
                d[1] |= 0x04; // LBPRZ = 001b
            }
            d[2] = 0x02; // thin provisioned
        }
        d
    }

    fn read_capacity_10(&self) -> Outcome {
        let last = self.blocks().saturating_sub(1);
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
        d.extend_from_slice(&self.settings.block_size.to_be_bytes());
        Outcome::Data(d)
    }

    fn read_capacity_16(&self, cdb: &[u8]) -> Outcome {
        let alloc = be32(cdb, 10) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&self.settings.block_size.to_be_bytes());
        let per_physical = (4096 / self.settings.block_size).max(1);
        d[13] = per_physical.trailing_zeros() as u8;
        if self.settings.discard && !self.settings.readonly {
            d[14] = 0x80; // LBPME
            if self.settings.unmapped_reads_zero {
                d[14] |= 0x40; // LBPRZ
            }
        }
        truncated(d, alloc)
    }

    fn check_range(&self, lba: u64, blocks: u64) -> Result<(), Sense> {
        match lba.checked_add(blocks) {
            Some(end) if end <= self.blocks() => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    fn rw6(&self, cdb: &[u8]) -> Outcome {
        let lba = u64::from(u32::from_be_bytes([0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
        let blocks = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
        self.rw_request(cdb[0] == WRITE_6, lba, blocks, false)
    }

    fn rw(&self, cdb: &[u8]) -> Outcome {
        let (lba, blocks) = match cdb[0] {
            READ_10 | WRITE_10 => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
            READ_12 | WRITE_12 => (u64::from(be32(cdb, 2)), be32(cdb, 6)),
            _ => (be64(cdb, 2), be32(cdb, 10)),
        };
        // RDPROTECT/WRPROTECT (protection information) is not supported.
        if cdb[1] & 0xe0 != 0 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        let is_write = matches!(cdb[0], WRITE_10 | WRITE_12 | WRITE_16);
        let fua = cdb[1] & 0x08 != 0;
        self.rw_request(is_write, lba, blocks, fua)
    }

    fn rw_request(&self, is_write: bool, lba: u64, blocks: u32, fua: bool) -> Outcome {
        if let Err(sense) = self.check_range(lba, u64::from(blocks)) {
            return Outcome::Check(sense);
        }
        if is_write && self.settings.readonly {
            return Outcome::Check(Sense::WRITE_PROTECTED);
        }
        if blocks > MAX_TRANSFER_BLOCKS {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        if blocks == 0 {
            return Outcome::Good;
        }
        Outcome::Io(if is_write {
            IoRequest::Write { lba, blocks, fua }
        } else {
            IoRequest::Read { lba, blocks }
        })
    }

    fn verify(&self, cdb: &[u8], data_out: &[u8]) -> Outcome {
        let (lba, blocks) = if cdb[0] == VERIFY_10 {
            (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7)))
        } else {
            (be64(cdb, 2), be32(cdb, 10))
        };
        if let Err(sense) = self.check_range(lba, u64::from(blocks)) {
            return Outcome::Check(sense);
        }
        // VRPROTECT (protection information) is not supported.
        if cdb[1] & 0xe0 != 0 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        let bs = self.settings.block_size as usize;
        let len = blocks as usize * bs;
        match (cdb[1] >> 1) & 0x03 {
            // No data-out: the medium is readable, which a range check establishes here.
            0b00 => Outcome::Good,
            _ if blocks == 0 => Outcome::Good,
            _ if len > MAX_VERIFY_BYTES => Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
            // Data-out holds every block.
            0b01 if data_out.len() >= len => Outcome::Io(IoRequest::Compare {
                lba,
                blocks,
                expected: data_out[..len].to_vec(),
            }),
            // Data-out holds one block, compared with each.
            0b11 if data_out.len() >= bs => Outcome::Io(IoRequest::Compare {
                lba,
                blocks,
                expected: data_out[..bs].repeat(blocks as usize),
            }),
            0b01 | 0b11 => Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR),
            _ => Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
        }
    }

    fn synchronize_cache(&self, cdb: &[u8]) -> Outcome {
        let (lba, blocks) = if cdb[0] == SYNCHRONIZE_CACHE_10 {
            (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
        } else {
            (be64(cdb, 2), u64::from(be32(cdb, 10)))
        };
        if let Err(sense) = self.check_range(lba, blocks) {
            return Outcome::Check(sense);
        }
        Outcome::Io(IoRequest::Flush)
    }

    /// UNMAP (SBC-4, UNMAP command). The lengths in the CDB and in the UNMAP parameter list
    /// header are read as SBC-4 and LIO's `sbc_execute_unmap` read them:
    ///
    /// - PARAMETER LIST LENGTH 0: nothing is sent, GOOD; 1 to 7 (shorter than the header):
    ///   PARAMETER LIST LENGTH ERROR. A data-out buffer holding fewer bytes than the
    ///   PARAMETER LIST LENGTH is the same error; bytes past it are not looked at.
    /// - The block descriptors are the UNMAP BLOCK DESCRIPTOR DATA LENGTH bytes after the
    ///   header, cut to what the PARAMETER LIST LENGTH transferred (a header that claims more
    ///   than was sent is not an error). An incomplete last descriptor is ignored, so a length
    ///   that is not a multiple of 16 is not an error either.
    /// - The UNMAP DATA LENGTH says how much follows it; nothing depends on it (as in LIO).
    /// - More descriptors than the Block Limits VPD page's MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT,
    ///   or more blocks in all than its MAXIMUM UNMAP LBA COUNT: INVALID FIELD IN PARAMETER LIST.
    /// - A descriptor whose LBA plus NUMBER OF LOGICAL BLOCKS exceeds the capacity: LOGICAL
    ///   BLOCK ADDRESS OUT OF RANGE. Descriptors are checked in order, each against the block
    ///   limit first (as LIO does); any error fails the command before anything is unmapped.
    fn unmap(&self, cdb: &[u8], params: &[u8]) -> Outcome {
        if self.settings.readonly {
            return Outcome::Check(Sense::WRITE_PROTECTED);
        }
        // ANCHOR is not supported (ANC_SUP is zero).
        if cdb[1] & 0x01 != 0 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        let list_len = usize::from(be16(cdb, 7));
        if list_len == 0 {
            return Outcome::Good;
        }
        let Some(list) = params.get(..list_len) else {
            return Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        };
        if list.len() < UNMAP_HEADER {
            return Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let (header, sent) = list.split_at(UNMAP_HEADER);
        let descriptor_bytes = usize::from(be16(header, 2)).min(sent.len());
        let descriptors = sent[..descriptor_bytes].chunks_exact(UNMAP_DESCRIPTOR);
        if descriptors.len() > MAX_UNMAP_DESCRIPTORS as usize {
            return Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
        }
        let mut ranges = Vec::with_capacity(descriptors.len());
        let mut total: u64 = 0;
        for d in descriptors {
            let lba = be64(d, 0);
            let blocks = be32(d, 8);
            total += u64::from(blocks);
            if total > u64::from(MAX_UNMAP_BLOCKS) {
                return Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
            if let Err(sense) = self.check_range(lba, u64::from(blocks)) {
                return Outcome::Check(sense);
            }
            if blocks > 0 {
                ranges.push((lba, blocks));
            }
        }
        if ranges.is_empty() {
            return Outcome::Good;
        }
        Outcome::Io(IoRequest::Unmap(ranges))
    }

    fn write_same(&self, cdb: &[u8], params: &[u8]) -> Outcome {
        let (lba, blocks) = if cdb[0] == WRITE_SAME_10 {
            (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7)))
        } else {
            (be64(cdb, 2), be32(cdb, 10))
        };
        let unmap = cdb[1] & 0x08 != 0;
        let anchor = cdb[1] & 0x10 != 0;
        let ndob = cdb[0] == WRITE_SAME_16 && cdb[1] & 0x01 != 0;
        // WRPROTECT, ANCHOR and (for WRITE SAME(10)) the obsolete PBDATA/LBDATA bits.
        if cdb[1] & 0xe0 != 0 || anchor || (cdb[0] == WRITE_SAME_10 && cdb[1] & 0x06 != 0) {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        if self.settings.readonly {
            return Outcome::Check(Sense::WRITE_PROTECTED);
        }
        if let Err(sense) = self.check_range(lba, u64::from(blocks)) {
            return Outcome::Check(sense);
        }
        // WSNZ is set: zero blocks is not "to the end of the medium".
        if blocks == 0 || blocks > MAX_WRITE_SAME_BLOCKS {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        if unmap && !self.settings.discard {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        let bs = self.settings.block_size as usize;
        let pattern: Cow<[u8]> = if ndob {
            Cow::Owned(vec![0u8; bs])
        } else if params.len() == bs {
            Cow::Borrowed(params)
        } else {
            // Exactly one logical block of data-out.
            return Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        };
        if self.settings.unmapped_reads_zero && pattern.iter().all(|&b| b == 0) {
            // The backing store zeroes ranges itself (deallocating them if UNMAP is set).
            return Outcome::Io(IoRequest::WriteZeroes { lba, blocks, unmap });
        }
        Outcome::Io(IoRequest::WriteSame {
            lba,
            blocks,
            pattern: pattern.into_owned(),
        })
    }

    /// REPORT SUPPORTED OPERATION CODES (SPC-4 6.35) from [`COMMANDS`]: REPORTING OPTIONS
    /// 000b (all commands, 6.35.2), 001b (an operation code without service actions) and 010b
    /// (an operation code and service action), both in the one_command format (6.35.3) with the
    /// command's CDB usage map; RCTD adds a command timeouts descriptor (6.35.4) to each.
    /// Other reporting options are refused.
    fn report_supported_opcodes(&self, cdb: &[u8]) -> Outcome {
        let rctd = cdb[2] & 0x80 != 0;
        let options = cdb[2] & 0x07;
        let req_op = cdb[3];
        let req_sa = be16(cdb, 4);
        let alloc = be32(cdb, 6) as usize;
        let timeouts: &[u8] = if rctd { &COMMAND_TIMEOUTS } else { &[] };
        match options {
            0b000 => {
                let mut list = Vec::new();
                for c in self.commands() {
                    list.push(c.opcode);
                    list.push(0);
                    list.extend_from_slice(&u16::from(c.service_action.unwrap_or(0)).to_be_bytes());
                    list.push(0);
                    // CTDP, SERVACTV.
                    list.push(u8::from(rctd) << 1 | u8::from(c.service_action.is_some()));
                    list.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                    list.extend_from_slice(timeouts);
                }
                let mut d = (list.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(&list);
                truncated(d, alloc)
            }
            0b001 | 0b010 => {
                // 001b names an operation code without service actions, 010b one with them;
                // asking the other way round is an error (SPC-4 6.35.1).
                let has_service_actions = self
                    .commands()
                    .find(|c| c.opcode == req_op)
                    .map(|c| c.service_action.is_some());
                if has_service_actions == Some(options == 0b001) {
                    return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
                }
                let command = self.commands().find(|c| {
                    c.opcode == req_op
                        && (options == 0b001 || c.service_action.map(u16::from) == Some(req_sa))
                });
                let mut d = vec![0u8; 4];
                match command {
                    Some(c) => {
                        // CTDP, SUPPORT 011b: supported, conforming to the standard.
                        d[1] = u8::from(rctd) << 7 | 0b011;
                        d[2..4].copy_from_slice(&(c.usage.len() as u16).to_be_bytes());
                        d.extend_from_slice(c.usage);
                        d.extend_from_slice(timeouts);
                    }
                    None => d[1] = 0b001, // not supported
                }
                truncated(d, alloc)
            }
            _ => Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
        }
    }
}

/// Whether REPORT LUNS (SPC-4) with `cdb` lists the logical units (SELECT REPORT 00h or
/// 02h) or nothing (01h: no well-known logical units), or the sense it is refused with.
fn report_luns_select(cdb: &[u8]) -> Result<bool, Sense> {
    if cdb.len() < 12 || cdb[11] & 0x04 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    if be32(cdb, 6) < 16 {
        return Err(Sense::INVALID_FIELD_IN_CDB);
    }
    match cdb[2] {
        0x00 | 0x02 => Ok(true),
        0x01 => Ok(false),
        _ => Err(Sense::INVALID_FIELD_IN_CDB),
    }
}

/// REPORT LUNS data (SPC-4) for `luns` (single-level LUN addressing), cut to the allocation
/// length; the list length field always tells the full length. The transport answers with it
/// where [`Lun::execute`] returns [`Outcome::ReportLuns`], and for absent logical units.
pub fn report_luns(cdb: &[u8], luns: &[u16]) -> Outcome {
    let luns: &[u16] = match report_luns_select(cdb) {
        Ok(true) => luns,
        Ok(false) => &[],
        Err(sense) => return Outcome::Check(sense),
    };
    let alloc = be32(cdb, 6) as usize;
    let mut d = ((luns.len() * 8) as u32).to_be_bytes().to_vec();
    d.extend_from_slice(&[0; 4]);
    for &lun in luns {
        let mut entry = [0u8; 8];
        if lun < 256 {
            entry[1] = lun as u8;
        } else {
            entry[0] = 0x40 | ((lun >> 8) as u8 & 0x3f);
            entry[1] = lun as u8;
        }
        d.extend_from_slice(&entry);
    }
    truncated(d, alloc)
}
