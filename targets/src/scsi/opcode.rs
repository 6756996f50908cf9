//! SCSI operation codes by name (SPC-4 / SBC-3), for every command the device server
//! implements or the target answers itself, and the metric op of each ([`metric_op`]).

use crate::stats::Op;

/// TEST UNIT READY (SPC-4 6.47).
pub const TEST_UNIT_READY: u8 = 0x00;
/// REQUEST SENSE (SPC-4 6.39).
pub const REQUEST_SENSE: u8 = 0x03;
/// READ(6) (SBC-3 5.13).
pub const READ_6: u8 = 0x08;
/// WRITE(6) (SBC-3 5.34).
pub const WRITE_6: u8 = 0x0a;
/// INQUIRY (SPC-4 6.6).
pub const INQUIRY: u8 = 0x12;
/// MODE SELECT(6) (SPC-4 6.9).
pub const MODE_SELECT_6: u8 = 0x15;
/// MODE SENSE(6) (SPC-4 6.11).
pub const MODE_SENSE_6: u8 = 0x1a;
/// START STOP UNIT (SBC-3 5.25).
pub const START_STOP_UNIT: u8 = 0x1b;
/// READ CAPACITY(10) (SBC-3 5.15).
pub const READ_CAPACITY_10: u8 = 0x25;
/// READ(10) (SBC-3 5.10).
pub const READ_10: u8 = 0x28;
/// WRITE(10) (SBC-3 5.35).
pub const WRITE_10: u8 = 0x2a;
/// VERIFY(10) (SBC-3 5.29).
pub const VERIFY_10: u8 = 0x2f;
/// SYNCHRONIZE CACHE(10) (SBC-3 5.26).
pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
/// WRITE SAME(10) (SBC-3 5.41).
pub const WRITE_SAME_10: u8 = 0x41;
/// UNMAP (SBC-3 5.28).
pub const UNMAP: u8 = 0x42;
/// MODE SELECT(10) (SPC-4 6.10).
pub const MODE_SELECT_10: u8 = 0x55;
/// MODE SENSE(10) (SPC-4 6.12).
pub const MODE_SENSE_10: u8 = 0x5a;
/// READ(16) (SBC-3 5.12).
pub const READ_16: u8 = 0x88;
/// WRITE(16) (SBC-3 5.37).
pub const WRITE_16: u8 = 0x8a;
/// VERIFY(16) (SBC-3 5.31).
pub const VERIFY_16: u8 = 0x8f;
/// SYNCHRONIZE CACHE(16) (SBC-3 5.27).
pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
/// WRITE SAME(16) (SBC-3 5.43).
pub const WRITE_SAME_16: u8 = 0x93;
/// SERVICE ACTION IN(16): READ CAPACITY(16), GET LBA STATUS (SBC-3 5.16, 5.8).
pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
/// REPORT LUNS (SPC-4 6.33).
pub const REPORT_LUNS: u8 = 0xa0;
/// MAINTENANCE IN: REPORT SUPPORTED OPERATION CODES and others (SPC-4 6.35).
pub const MAINTENANCE_IN: u8 = 0xa3;
/// READ(12) (SBC-3 5.11).
pub const READ_12: u8 = 0xa8;
/// WRITE(12) (SBC-3 5.36).
pub const WRITE_12: u8 = 0xaa;

/// The metric op of a command, by operation code (see [`Op`]).
pub fn metric_op(opcode: u8) -> Op {
    match opcode {
        READ_6 | READ_10 | READ_12 | READ_16 | VERIFY_10 | VERIFY_16 => Op::Read,
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 => Op::Write,
        SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => Op::Flush,
        UNMAP => Op::Discard,
        WRITE_SAME_10 | WRITE_SAME_16 => Op::WriteZeroes,
        _ => Op::Other,
    }
}
