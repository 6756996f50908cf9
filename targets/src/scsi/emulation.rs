//! Block-device command emulation for one logical unit (SPC-4 / SBC-3), modelled on
//! Linux LIO's `target_core_spc.c` / `target_core_sbc.c`.
//!
//! [`Lun::execute`] turns a CDB (plus, for parameter-list commands, the data-out bytes)
//! into an [`Outcome`]: data to return, a CHECK CONDITION with sense, or a disk I/O request
//! for the transport to run. Every length is checked before use; nothing here panics on
//! what an initiator sends.

use std::borrow::Cow;

use super::sense::Sense;

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
    /// Capacity in logical blocks.
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
}

/// Largest data-out a VERIFY with BYTCHK may carry (the maximum transfer at 4 KiB blocks).
pub const MAX_VERIFY_BYTES: usize = MAX_TRANSFER_BLOCKS as usize * 4096;

/// How many data-out bytes a command wants gathered for [`Lun::execute`]: parameter lists,
/// and the data VERIFY compares. Bulk WRITE data is not gathered (it goes straight to disk).
pub fn data_out_to_gather(cdb: &[u8]) -> usize {
    match cdb.first() {
        Some(0x15 | 0x55 | 0x42 | 0x41 | 0x93) => MAX_PARAMETER_LIST,
        Some(0x2f | 0x8f) if cdb.get(1).is_some_and(|b| b & 0x06 != 0) => MAX_VERIFY_BYTES,
        _ => 0,
    }
}

/// True for commands that do not report (or clear) a pending unit attention (SPC-4 5.14).
pub fn ignores_unit_attention(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x12 | 0xa0 | 0x03))
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
#[derive(Debug, Clone)]
pub struct Lun {
    settings: LunSettings,
}

/// Opcodes with their CDB length and service action (for REPORT SUPPORTED OPERATION CODES).
const SUPPORTED: &[(u8, Option<u16>, usize)] = &[
    (0x00, None, 6),        // TEST UNIT READY
    (0x03, None, 6),        // REQUEST SENSE
    (0x08, None, 6),        // READ(6)
    (0x0a, None, 6),        // WRITE(6)
    (0x12, None, 6),        // INQUIRY
    (0x15, None, 6),        // MODE SELECT(6)
    (0x1a, None, 6),        // MODE SENSE(6)
    (0x1b, None, 6),        // START STOP UNIT
    (0x25, None, 10),       // READ CAPACITY(10)
    (0x28, None, 10),       // READ(10)
    (0x2a, None, 10),       // WRITE(10)
    (0x2f, None, 10),       // VERIFY(10) (BYTCHK 00b, 01b, 11b)
    (0x35, None, 10),       // SYNCHRONIZE CACHE(10)
    (0x41, None, 10),       // WRITE SAME(10)
    (0x42, None, 10),       // UNMAP
    (0x55, None, 10),       // MODE SELECT(10)
    (0x5a, None, 10),       // MODE SENSE(10)
    (0x88, None, 16),       // READ(16)
    (0x8a, None, 16),       // WRITE(16)
    (0x8f, None, 16),       // VERIFY(16)
    (0x91, None, 16),       // SYNCHRONIZE CACHE(16)
    (0x93, None, 16),       // WRITE SAME(16)
    (0x9e, Some(0x10), 16), // READ CAPACITY(16)
    (0xa0, None, 12),       // REPORT LUNS
    (0xa3, Some(0x0c), 12), // REPORT SUPPORTED OPERATION CODES
    (0xa8, None, 12),       // READ(12)
    (0xaa, None, 12),       // WRITE(12)
];

impl Lun {
    /// A logical unit with `settings`.
    pub fn new(settings: LunSettings) -> Self {
        Lun { settings }
    }

    /// Its settings.
    pub fn settings(&self) -> &LunSettings {
        &self.settings
    }

    /// Executes `cdb` (the transport's fixed-size CDB field); `parameters` are the gathered
    /// data-out bytes for parameter-list commands, empty otherwise.
    pub fn execute(&self, cdb: &[u8], parameters: &[u8]) -> Outcome {
        let Some(&opcode) = cdb.first() else {
            return Outcome::Check(Sense::INVALID_OPCODE);
        };
        let Some(len) = cdb_length(opcode) else {
            return Outcome::Check(Sense::INVALID_OPCODE);
        };
        if cdb.len() < len {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        // NACA (control byte bit 2) is not supported.
        if cdb[len - 1] & 0x04 != 0 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        let cdb = &cdb[..len];
        match opcode {
            0x00 => Outcome::Good,
            0x03 => self.request_sense(cdb),
            0x12 => self.inquiry(cdb),
            0x25 => self.read_capacity_10(),
            0x9e if cdb[1] & 0x1f == 0x10 => self.read_capacity_16(cdb),
            0x08 | 0x0a => self.rw6(cdb),
            0x28 | 0x2a | 0xa8 | 0xaa | 0x88 | 0x8a => self.rw(cdb),
            0x2f | 0x8f => self.verify(cdb, parameters),
            0x35 | 0x91 => self.synchronize_cache(cdb),
            0x42 => self.unmap(cdb, parameters),
            0x41 | 0x93 => self.write_same(cdb, parameters),
            0x1a | 0x5a => self.mode_sense(cdb),
            0x15 | 0x55 => self.mode_select(cdb, parameters),
            0xa3 if cdb[1] & 0x1f == 0x0c => self.report_supported_opcodes(cdb),
            0x1b => Outcome::Good,
            _ => Outcome::Check(Sense::INVALID_OPCODE),
        }
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
        if cdb[1] & 0xfe != 0 {
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
        let last = self.settings.blocks.saturating_sub(1);
        let mut d = Vec::with_capacity(8);
        d.extend_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
        d.extend_from_slice(&self.settings.block_size.to_be_bytes());
        Outcome::Data(d)
    }

    fn read_capacity_16(&self, cdb: &[u8]) -> Outcome {
        let alloc = be32(cdb, 10) as usize;
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.settings.blocks.saturating_sub(1).to_be_bytes());
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
            Some(end) if end <= self.settings.blocks => Ok(()),
            _ => Err(Sense::LBA_OUT_OF_RANGE),
        }
    }

    fn rw6(&self, cdb: &[u8]) -> Outcome {
        let lba = u64::from(u32::from_be_bytes([0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
        let blocks = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
        self.rw_request(cdb[0] == 0x0a, lba, blocks, false)
    }

    fn rw(&self, cdb: &[u8]) -> Outcome {
        let (lba, blocks) = match cdb[0] {
            0x28 | 0x2a => (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7))),
            0xa8 | 0xaa => (u64::from(be32(cdb, 2)), be32(cdb, 6)),
            _ => (be64(cdb, 2), be32(cdb, 10)),
        };
        // RDPROTECT/WRPROTECT (protection information) is not supported.
        if cdb[1] & 0xe0 != 0 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        let is_write = matches!(cdb[0], 0x2a | 0xaa | 0x8a);
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
        let (lba, blocks) = if cdb[0] == 0x2f {
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
        let (lba, blocks) = if cdb[0] == 0x35 {
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
        if !self.settings.discard {
            return Outcome::Check(Sense::INVALID_OPCODE);
        }
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
        let (lba, blocks) = if cdb[0] == 0x41 {
            (u64::from(be32(cdb, 2)), u32::from(be16(cdb, 7)))
        } else {
            (be64(cdb, 2), be32(cdb, 10))
        };
        let unmap = cdb[1] & 0x08 != 0;
        let anchor = cdb[1] & 0x10 != 0;
        let ndob = cdb[0] == 0x93 && cdb[1] & 0x01 != 0;
        // WRPROTECT, ANCHOR and (for WRITE SAME(10)) the obsolete PBDATA/LBDATA bits.
        if cdb[1] & 0xe0 != 0 || anchor || (cdb[0] == 0x41 && cdb[1] & 0x06 != 0) {
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

    /// Mode page `code` as currently set (or its changeable mask: nothing is changeable).
    fn mode_page(&self, code: u8, changeable: bool) -> Option<Vec<u8>> {
        match code {
            0x08 => {
                let mut p = vec![0u8; 20];
                p[0] = 0x08;
                p[1] = 0x12;
                if !changeable && self.settings.write_cache {
                    p[2] = 0x04; // WCE
                }
                Some(p)
            }
            0x0a => {
                let mut p = vec![0u8; 12];
                p[0] = 0x0a;
                p[1] = 0x0a;
                if !changeable {
                    p[3] = 0x10; // QUEUE ALGORITHM MODIFIER = unrestricted reordering
                }
                Some(p)
            }
            _ => None,
        }
    }

    fn mode_sense(&self, cdb: &[u8]) -> Outcome {
        let ten = cdb[0] == 0x5a;
        let dbd = cdb[1] & 0x08 != 0;
        let pc = cdb[2] >> 6;
        let page = cdb[2] & 0x3f;
        let subpage = cdb[3];
        let alloc = if ten {
            usize::from(be16(cdb, 7))
        } else {
            usize::from(cdb[4])
        };
        if pc == 3 {
            return Outcome::Check(Sense::SAVING_PARAMETERS_NOT_SUPPORTED);
        }
        if subpage != 0 && subpage != 0xff {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        let changeable = pc == 1;
        let pages: Vec<u8> = match page {
            0x3f => [0x08u8, 0x0a]
                .iter()
                .filter_map(|&c| self.mode_page(c, changeable))
                .flatten()
                .collect(),
            code => match self.mode_page(code, changeable) {
                Some(p) => p,
                None => return Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
            },
        };
        let mut block_descriptor = Vec::new();
        if !dbd {
            let blocks = u32::try_from(self.settings.blocks).unwrap_or(u32::MAX);
            block_descriptor.extend_from_slice(&blocks.to_be_bytes());
            block_descriptor.push(0);
            block_descriptor.extend_from_slice(&self.settings.block_size.to_be_bytes()[1..]);
        }
        // WP for read-only, DPOFUA: FUA is honoured.
        let device_specific = if self.settings.readonly { 0x80 } else { 0 } | 0x10;
        let mut d = Vec::new();
        if ten {
            let len = 6 + block_descriptor.len() + pages.len();
            d.extend_from_slice(&(len as u16).to_be_bytes());
            d.extend_from_slice(&[0, device_specific, 0, 0]);
            d.extend_from_slice(&(block_descriptor.len() as u16).to_be_bytes());
        } else {
            let len = 3 + block_descriptor.len() + pages.len();
            d.extend_from_slice(&[
                u8::try_from(len).unwrap_or(u8::MAX),
                0,
                device_specific,
                block_descriptor.len() as u8,
            ]);
        }
        d.extend_from_slice(&block_descriptor);
        d.extend_from_slice(&pages);
        truncated(d, alloc)
    }

    /// MODE SELECT: accepted only when it sets the current values.
    fn mode_select(&self, cdb: &[u8], params: &[u8]) -> Outcome {
        let ten = cdb[0] == 0x55;
        let list_len = if ten {
            usize::from(be16(cdb, 7))
        } else {
            usize::from(cdb[4])
        };
        // PF must be set; SP (save pages) is not supported.
        if cdb[1] & 0x10 == 0 && list_len > 0 {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        if cdb[1] & 0x01 != 0 {
            return Outcome::Check(Sense::SAVING_PARAMETERS_NOT_SUPPORTED);
        }
        if list_len == 0 {
            return Outcome::Good;
        }
        if params.len() < list_len {
            return Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let params = &params[..list_len];
        let header = if ten { 8 } else { 4 };
        if params.len() < header {
            return Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        let bd_len = if ten {
            usize::from(be16(params, 6))
        } else {
            usize::from(params[3])
        };
        let mut at = header + bd_len;
        if at > params.len() || (bd_len != 0 && bd_len != 8) {
            return Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        if bd_len == 8 {
            let bd = &params[header..header + 8];
            let block_len = u32::from_be_bytes([0, bd[5], bd[6], bd[7]]);
            if block_len != self.settings.block_size {
                return Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
        }
        while at < params.len() {
            if at + 2 > params.len() {
                return Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR);
            }
            let code = params[at] & 0x3f;
            let len = usize::from(params[at + 1]) + 2;
            if params[at] & 0x40 != 0 || at + len > params.len() {
                return Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST);
            }
            match self.mode_page(code, false) {
                Some(current)
                    if current.len() == len && current[1..] == params[at + 1..at + len] => {}
                _ => return Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST),
            }
            at += len;
        }
        Outcome::Good
    }

    fn report_supported_opcodes(&self, cdb: &[u8]) -> Outcome {
        let options = cdb[2] & 0x07;
        let rctd = cdb[2] & 0x80 != 0;
        let req_op = cdb[3];
        let req_sa = be16(cdb, 4);
        let alloc = be32(cdb, 6) as usize;
        if rctd {
            return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
        }
        match options {
            0 => {
                let mut list = Vec::new();
                for &(op, sa, len) in SUPPORTED {
                    list.push(op);
                    list.push(0);
                    list.extend_from_slice(&sa.unwrap_or(0).to_be_bytes());
                    list.push(0);
                    list.push(u8::from(sa.is_some())); // SERVACTV
                    list.extend_from_slice(&(len as u16).to_be_bytes());
                }
                let mut d = (list.len() as u32).to_be_bytes().to_vec();
                d.extend_from_slice(&list);
                truncated(d, alloc)
            }
            1 | 2 => {
                // Option 1 names an opcode without service actions, option 2 one with them;
                // asking the other way round is an error (SPC-4 6.35.2).
                let has_service_actions = SUPPORTED
                    .iter()
                    .find(|&&(op, _, _)| op == req_op)
                    .map(|&(_, sa, _)| sa.is_some());
                if has_service_actions == Some(options == 1) {
                    return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
                }
                let entry = SUPPORTED
                    .iter()
                    .find(|&&(op, sa, _)| op == req_op && (options == 1 || sa == Some(req_sa)));
                let mut d = vec![0u8; 4];
                match entry {
                    Some(&(op, _, len)) => {
                        d[1] = 0x03; // supported, conforming to the standard
                        d[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                        // CDB usage map: every bit that can be set.
                        let mut usage = vec![0xffu8; len];
                        usage[0] = op;
                        d.extend_from_slice(&usage);
                    }
                    None => d[1] = 0x01, // not supported
                }
                truncated(d, alloc)
            }
            _ => Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
        }
    }
}

/// REPORT LUNS data for `luns` (single-level LUN addressing), cut to the allocation length;
/// the list length field always tells the full length.
pub fn report_luns(cdb: &[u8], luns: &[u16]) -> Outcome {
    if cdb.len() < 12 || cdb[11] & 0x04 != 0 {
        return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
    }
    let select = cdb[2];
    let alloc = be32(cdb, 6) as usize;
    if alloc < 16 {
        return Outcome::Check(Sense::INVALID_FIELD_IN_CDB);
    }
    let luns: &[u16] = match select {
        0x00 | 0x02 => luns,
        0x01 => &[], // no well-known LUNs
        _ => return Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
    };
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
