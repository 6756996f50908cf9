//! The command table of the emulated logical unit: `COMMANDS` lists every implemented
//! command (operation code, service action, CDB usage map per SPC-4 6.35.3, handler, and
//! whether a LUN's settings enable it), with the `Command` type and the CONTROL byte usage
//! it is built from. [`Lun::execute`] dispatches through it and REPORT SUPPORTED OPERATION
//! CODES reports from it; the handlers themselves live in the parent module.

use super::{report_luns_select, Lun, LunSettings, Outcome};
use crate::scsi::opcode;

/// CONTROL byte usage (SAM-5, CONTROL byte): NACA is evaluated (a CDB with NACA set is
/// refused, see [`Lun::execute`]); the vendor-specific bits and the obsolete FLAG and LINK bits
/// are ignored.
const CONTROL: u8 = 0x04;

/// A command the device server implements: how it runs and what REPORT SUPPORTED OPERATION
/// CODES (SPC-4 6.35) says of it. [`COMMANDS`] lists them all; a command missing there is
/// refused with INVALID COMMAND OPERATION CODE and not reported.
pub(super) struct Command {
    /// OPERATION CODE.
    pub(super) opcode: u8,
    /// SERVICE ACTION (CDB byte 1, bits 4..0) for operation codes that have service actions.
    pub(super) service_action: Option<u8>,
    /// CDB USAGE DATA (SPC-4 6.35.3), as long as the CDB: the operation code, the service
    /// action in its field, and elsewhere a one for each bit the device server evaluates (its
    /// value changes what the command does, or a value the device server does not implement is
    /// refused) and a zero for each bit it ignores (reserved, obsolete, or a field such as
    /// GROUP NUMBER that has no effect here). Setting a bit this map shows as zero never
    /// changes a command's outcome.
    pub(super) usage: &'static [u8],
    /// Runs the command on the CDB (cut to its length) and the gathered data-out bytes.
    pub(super) run: fn(&Lun, &[u8], &[u8]) -> Outcome,
    /// Whether this logical unit implements the command.
    pub(super) enabled: fn(&LunSettings) -> bool,
}

fn always(_: &LunSettings) -> bool {
    true
}

/// Every command the device server implements, in operation code order. A command added here
/// runs and is reported with its CDB usage map; the two cannot disagree.
pub(super) const COMMANDS: &[Command] = &[
    // TEST UNIT READY (SPC-4): nothing to evaluate.
    Command {
        opcode: opcode::TEST_UNIT_READY,
        service_action: None,
        usage: &[0x00, 0x00, 0x00, 0x00, 0x00, CONTROL],
        run: |_, _, _| Outcome::Good,
        enabled: always,
    },
    // REQUEST SENSE (SPC-4): DESC (refused), ALLOCATION LENGTH.
    Command {
        opcode: opcode::REQUEST_SENSE,
        service_action: None,
        usage: &[0x03, 0x01, 0x00, 0x00, 0xff, CONTROL],
        run: |l, cdb, _| l.request_sense(cdb),
        enabled: always,
    },
    // READ(6) (SBC-3): LBA, TRANSFER LENGTH.
    Command {
        opcode: opcode::READ_6,
        service_action: None,
        usage: &[0x08, 0x1f, 0xff, 0xff, 0xff, CONTROL],
        run: |l, cdb, _| l.rw6(cdb),
        enabled: always,
    },
    // WRITE(6) (SBC-3): LBA, TRANSFER LENGTH.
    Command {
        opcode: opcode::WRITE_6,
        service_action: None,
        usage: &[0x0a, 0x1f, 0xff, 0xff, 0xff, CONTROL],
        run: |l, cdb, _| l.rw6(cdb),
        enabled: always,
    },
    // INQUIRY (SPC-4): CMDDT (obsolete, refused), EVPD, PAGE CODE, ALLOCATION LENGTH.
    Command {
        opcode: opcode::INQUIRY,
        service_action: None,
        usage: &[0x12, 0x03, 0xff, 0xff, 0xff, CONTROL],
        run: |l, cdb, _| l.inquiry(cdb),
        enabled: always,
    },
    // MODE SELECT(6) (SPC-4): PF, SP (refused), PARAMETER LIST LENGTH.
    Command {
        opcode: opcode::MODE_SELECT_6,
        service_action: None,
        usage: &[0x15, 0x11, 0x00, 0x00, 0xff, CONTROL],
        run: |l, cdb, params| l.mode_select(cdb, params),
        enabled: always,
    },
    // MODE SENSE(6) (SPC-4): DBD, PC, PAGE CODE, SUBPAGE CODE, ALLOCATION LENGTH.
    Command {
        opcode: opcode::MODE_SENSE_6,
        service_action: None,
        usage: &[0x1a, 0x08, 0xff, 0xff, 0xff, CONTROL],
        run: |l, cdb, _| l.mode_sense(cdb),
        enabled: always,
    },
    // START STOP UNIT (SBC-3): accepted, nothing evaluated (there is no medium to move).
    Command {
        opcode: opcode::START_STOP_UNIT,
        service_action: None,
        usage: &[0x1b, 0x00, 0x00, 0x00, 0x00, CONTROL],
        run: |_, _, _| Outcome::Good,
        enabled: always,
    },
    // READ CAPACITY(10) (SBC-3): the obsolete LBA and PMI are ignored.
    Command {
        opcode: opcode::READ_CAPACITY_10,
        service_action: None,
        usage: &[
            0x25, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, CONTROL,
        ],
        run: |l, _, _| l.read_capacity_10(),
        enabled: always,
    },
    // READ(10) (SBC-3): RDPROTECT (refused), DPO, FUA, LBA, TRANSFER LENGTH. MODE SENSE
    // reports DPOFUA, so DPO and FUA are supported (SBC-4 5.15: accepted, not refused):
    // every read already comes from the backing store, which is the medium, and DPO is a
    // cache-retention hint with nothing to retain. libiscsi's DpoFua tests hold the usage
    // map to DPOFUA.
    Command {
        opcode: opcode::READ_10,
        service_action: None,
        usage: &[
            0x28, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x00, 0xff, 0xff, CONTROL,
        ],
        run: |l, cdb, _| l.rw(cdb),
        enabled: always,
    },
    // WRITE(10) (SBC-3): WRPROTECT (refused), DPO (a supported hint), FUA, LBA, TRANSFER LENGTH.
    Command {
        opcode: opcode::WRITE_10,
        service_action: None,
        usage: &[
            0x2a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0x00, 0xff, 0xff, CONTROL,
        ],
        run: |l, cdb, _| l.rw(cdb),
        enabled: always,
    },
    // VERIFY(10) (SBC-3): VRPROTECT (refused), DPO (a supported hint), BYTCHK, LBA,
    // VERIFICATION LENGTH.
    Command {
        opcode: opcode::VERIFY_10,
        service_action: None,
        usage: &[
            0x2f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0x00, 0xff, 0xff, CONTROL,
        ],
        run: |l, cdb, params| l.verify(cdb, params),
        enabled: always,
    },
    // SYNCHRONIZE CACHE(10) (SBC-3): LBA and NUMBER OF LOGICAL BLOCKS (range-checked; the
    // whole cache is flushed). IMMED is ignored: status comes once the data is durable.
    Command {
        opcode: opcode::SYNCHRONIZE_CACHE_10,
        service_action: None,
        usage: &[
            0x35, 0x00, 0xff, 0xff, 0xff, 0xff, 0x00, 0xff, 0xff, CONTROL,
        ],
        run: |l, cdb, _| l.synchronize_cache(cdb),
        enabled: always,
    },
    // WRITE SAME(10) (SBC-3): WRPROTECT, ANCHOR, PBDATA, LBDATA (refused), UNMAP, LBA,
    // NUMBER OF LOGICAL BLOCKS.
    Command {
        opcode: opcode::WRITE_SAME_10,
        service_action: None,
        usage: &[
            0x41, 0xfe, 0xff, 0xff, 0xff, 0xff, 0x00, 0xff, 0xff, CONTROL,
        ],
        run: |l, cdb, params| l.write_same(cdb, params),
        enabled: always,
    },
    // UNMAP (SBC-3), where the backing store deallocates: ANCHOR (refused), PARAMETER LIST
    // LENGTH.
    Command {
        opcode: opcode::UNMAP,
        service_action: None,
        usage: &[
            0x42, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, CONTROL,
        ],
        run: |l, cdb, params| l.unmap(cdb, params),
        enabled: |s| s.discard,
    },
    // MODE SELECT(10) (SPC-4): PF, SP (refused), PARAMETER LIST LENGTH.
    Command {
        opcode: opcode::MODE_SELECT_10,
        service_action: None,
        usage: &[
            0x55, 0x11, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, CONTROL,
        ],
        run: |l, cdb, params| l.mode_select(cdb, params),
        enabled: always,
    },
    // MODE SENSE(10) (SPC-4): DBD, PC, PAGE CODE, SUBPAGE CODE, ALLOCATION LENGTH. LLBAA is
    // ignored: block descriptors are always short.
    Command {
        opcode: opcode::MODE_SENSE_10,
        service_action: None,
        usage: &[
            0x5a, 0x08, 0xff, 0xff, 0x00, 0x00, 0x00, 0xff, 0xff, CONTROL,
        ],
        run: |l, cdb, _| l.mode_sense(cdb),
        enabled: always,
    },
    // READ(16) (SBC-3): RDPROTECT (refused), DPO, FUA (as READ(10)), LBA, TRANSFER LENGTH.
    Command {
        opcode: opcode::READ_16,
        service_action: None,
        usage: &[
            0x88, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, CONTROL,
        ],
        run: |l, cdb, _| l.rw(cdb),
        enabled: always,
    },
    // WRITE(16) (SBC-3): WRPROTECT (refused), DPO (a supported hint), FUA, LBA, TRANSFER LENGTH.
    Command {
        opcode: opcode::WRITE_16,
        service_action: None,
        usage: &[
            0x8a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, CONTROL,
        ],
        run: |l, cdb, _| l.rw(cdb),
        enabled: always,
    },
    // VERIFY(16) (SBC-3): VRPROTECT (refused), DPO (a supported hint), BYTCHK, LBA,
    // VERIFICATION LENGTH.
    Command {
        opcode: opcode::VERIFY_16,
        service_action: None,
        usage: &[
            0x8f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, CONTROL,
        ],
        run: |l, cdb, params| l.verify(cdb, params),
        enabled: always,
    },
    // SYNCHRONIZE CACHE(16) (SBC-3): LBA, NUMBER OF LOGICAL BLOCKS; IMMED ignored.
    Command {
        opcode: opcode::SYNCHRONIZE_CACHE_16,
        service_action: None,
        usage: &[
            0x91, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, CONTROL,
        ],
        run: |l, cdb, _| l.synchronize_cache(cdb),
        enabled: always,
    },
    // WRITE SAME(16) (SBC-3): WRPROTECT, ANCHOR (refused), UNMAP, NDOB, LBA, NUMBER OF
    // LOGICAL BLOCKS; the obsolete bits 2..1 are ignored.
    Command {
        opcode: opcode::WRITE_SAME_16,
        service_action: None,
        usage: &[
            0x93, 0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            0x00, CONTROL,
        ],
        run: |l, cdb, params| l.write_same(cdb, params),
        enabled: always,
    },
    // READ CAPACITY(16) (SBC-3; SERVICE ACTION IN(16)): ALLOCATION LENGTH; the obsolete LBA
    // and PMI are ignored.
    Command {
        opcode: opcode::SERVICE_ACTION_IN_16,
        service_action: Some(0x10),
        usage: &[
            0x9e, 0x10, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff,
            0x00, CONTROL,
        ],
        run: |l, cdb, _| l.read_capacity_16(cdb),
        enabled: always,
    },
    // REPORT LUNS (SPC-4): SELECT REPORT, ALLOCATION LENGTH. The data lists the whole
    // target, which the transport fills in (see [`report_luns`]).
    Command {
        opcode: opcode::REPORT_LUNS,
        service_action: None,
        usage: &[
            0xa0, 0x00, 0xff, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0x00, CONTROL,
        ],
        run: |_, cdb, _| match report_luns_select(cdb) {
            Ok(_) => Outcome::ReportLuns,
            Err(sense) => Outcome::Check(sense),
        },
        enabled: always,
    },
    // REPORT SUPPORTED OPERATION CODES (SPC-4 6.35; MAINTENANCE IN): RCTD, REPORTING
    // OPTIONS, REQUESTED OPERATION CODE, REQUESTED SERVICE ACTION, ALLOCATION LENGTH.
    Command {
        opcode: opcode::MAINTENANCE_IN,
        service_action: Some(0x0c),
        usage: &[
            0xa3, 0x0c, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, CONTROL,
        ],
        run: |l, cdb, _| l.report_supported_opcodes(cdb),
        enabled: always,
    },
    // READ(12) (SBC-3): RDPROTECT (refused), DPO, FUA (as READ(10)), LBA, TRANSFER LENGTH.
    Command {
        opcode: opcode::READ_12,
        service_action: None,
        usage: &[
            0xa8, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, CONTROL,
        ],
        run: |l, cdb, _| l.rw(cdb),
        enabled: always,
    },
    // WRITE(12) (SBC-3): WRPROTECT (refused), FUA, LBA, TRANSFER LENGTH.
    Command {
        opcode: opcode::WRITE_12,
        service_action: None,
        usage: &[
            0xaa, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, CONTROL,
        ],
        run: |l, cdb, _| l.rw(cdb),
        enabled: always,
    },
];
