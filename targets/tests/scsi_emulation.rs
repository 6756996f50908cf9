//! SCSI command emulation, command by command: good CDBs, malformed ones, truncated
//! allocation lengths, and the sense each error gets.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use targets::scsi::emulation::{cdb_length, report_luns, IoRequest, Lun, LunSettings, Outcome};
use targets::scsi::sense::Sense;

const BLOCKS: u64 = 2048;

fn settings() -> LunSettings {
    LunSettings {
        block_size: 512,
        blocks: BLOCKS,
        readonly: false,
        serial: "SER123".into(),
        wwn: 0x6001_4050_0000_0001,
        rotational: false,
        write_cache: true,
        discard: true,
        unmapped_reads_zero: true,
    }
}

fn lun() -> Lun {
    Lun::new(settings())
}

fn data(o: Outcome) -> Vec<u8> {
    match o {
        Outcome::Data(d) => d,
        other => panic!("expected data, got {other:?}"),
    }
}

fn cdb(bytes: &[u8]) -> Vec<u8> {
    let mut c = bytes.to_vec();
    c.resize(32, 0);
    c
}

fn check(o: Outcome) -> Sense {
    match o {
        Outcome::Check(s) => s,
        other => panic!("expected CHECK CONDITION, got {other:?}"),
    }
}

#[test]
fn test_unit_ready_and_unknown_opcodes() {
    assert_eq!(lun().execute(&cdb(&[0x00]), &[]), Outcome::Good);
    assert_eq!(
        check(lun().execute(&cdb(&[0xee]), &[])),
        Sense::INVALID_OPCODE
    );
    assert_eq!(
        check(lun().execute(&cdb(&[0x02]), &[])),
        Sense::INVALID_OPCODE
    );
    assert_eq!(check(lun().execute(&[], &[])), Sense::INVALID_OPCODE);
    // A CDB shorter than its group's length.
    assert_eq!(
        check(lun().execute(&[0x28, 0, 0], &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    // NACA set in the control byte.
    assert_eq!(
        check(lun().execute(&cdb(&[0x00, 0, 0, 0, 0, 0x04]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
}

#[test]
fn standard_inquiry_and_truncation() {
    let d = data(lun().execute(&cdb(&[0x12, 0, 0, 0, 96]), &[]));
    assert_eq!(d.len(), 74);
    assert_eq!(
        &d[58..64],
        &[0x00, 0xa0, 0x04, 0x60, 0x04, 0xc0],
        "SAM-5, SPC-4, SBC-3"
    );
    assert_eq!(d[0], 0x00, "direct access block device");
    assert_eq!(d[4] as usize, d.len() - 5);
    assert_eq!(&d[8..16], b"VHOSTAPP");
    let d = data(lun().execute(&cdb(&[0x12, 0, 0, 0, 5]), &[]));
    assert_eq!(d.len(), 5, "cut to the allocation length");
    assert_eq!(d[4], 69, "additional length still tells the full length");
    // EVPD clear with a page code, reserved bits.
    assert_eq!(
        check(lun().execute(&cdb(&[0x12, 0, 0x80, 0, 96]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(lun().execute(&cdb(&[0x12, 0x02, 0, 0, 96]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(Lun::standard_inquiry(true)[0], 0x7f, "absent LUN qualifier");
}

#[test]
fn vpd_pages() {
    let l = lun();
    let vpd = |page: u8| data(l.execute(&cdb(&[0x12, 1, page, 0x10, 0]), &[]));
    let supported = vpd(0x00);
    assert_eq!(&supported[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    let serial = vpd(0x80);
    assert_eq!(&serial[4..], b"SER123");
    let ids = vpd(0x83);
    assert_eq!(
        &ids[4..8],
        &[0x01, 0x03, 0x00, 0x08],
        "binary NAA designator"
    );
    assert_eq!(&ids[8..16], &0x6001_4050_0000_0001u64.to_be_bytes());
    assert_eq!(ids[16] & 0x0f, 0x02, "ASCII T10 vendor id designator");
    let limits = vpd(0xb0);
    assert_eq!(u16::from_be_bytes([limits[2], limits[3]]), 0x3c);
    let max_transfer = u32::from_be_bytes(limits[8..12].try_into().unwrap());
    assert!(max_transfer > 0);
    let max_unmap = u32::from_be_bytes(limits[20..24].try_into().unwrap());
    let max_descriptors = u32::from_be_bytes(limits[24..28].try_into().unwrap());
    assert!(max_unmap > 0 && max_descriptors > 0);
    let chars = vpd(0xb1);
    assert_eq!(u16::from_be_bytes([chars[4], chars[5]]), 1, "non-rotating");
    let lbp = vpd(0xb2);
    assert_eq!(lbp[5] & 0xe4, 0xe4, "LBPU, LBPWS, LBPWS10, LBPRZ");
    assert_eq!(lbp[6] & 0x07, 0x02, "thin provisioned");
    assert_eq!(
        check(l.execute(&cdb(&[0x12, 1, 0x99, 0, 64]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    // LBPRZ only when unmapped blocks really read back as zero.
    let no_rz = Lun::new(LunSettings {
        unmapped_reads_zero: false,
        ..settings()
    });
    let lbp = data(no_rz.execute(&cdb(&[0x12, 1, 0xb2, 0, 64]), &[]));
    assert_eq!(lbp[5] & 0x1c, 0);
    // Without discard nothing is advertised.
    let thick = Lun::new(LunSettings {
        discard: false,
        ..settings()
    });
    assert_eq!(
        data(thick.execute(&cdb(&[0x12, 1, 0xb2, 0, 64]), &[]))[5],
        0
    );
}

#[test]
fn read_capacity() {
    let d = data(lun().execute(&cdb(&[0x25]), &[]));
    assert_eq!(
        u32::from_be_bytes(d[0..4].try_into().unwrap()),
        BLOCKS as u32 - 1
    );
    assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 512);
    let d = data(lun().execute(
        &cdb(&[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32]),
        &[],
    ));
    assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), BLOCKS - 1);
    assert_eq!(d[13], 3, "8 logical blocks per 4 KiB physical block");
    assert_eq!(d[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    let d = data(lun().execute(
        &cdb(&[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12]),
        &[],
    ));
    assert_eq!(d.len(), 12);
    // Huge disks report 0xffffffff in READ CAPACITY(10).
    let big = Lun::new(LunSettings {
        blocks: 1 << 33,
        ..settings()
    });
    let d = data(big.execute(&cdb(&[0x25]), &[]));
    assert_eq!(&d[0..4], &[0xff; 4]);
}

#[test]
fn reads_and_writes_all_sizes() {
    let l = lun();
    assert_eq!(
        l.execute(&cdb(&[0x08, 0, 0, 10, 4]), &[]),
        Outcome::Io(IoRequest::Read { lba: 10, blocks: 4 })
    );
    assert_eq!(
        l.execute(&cdb(&[0x08, 0, 0, 0, 0]), &[]),
        Outcome::Io(IoRequest::Read {
            lba: 0,
            blocks: 256
        }),
        "READ(6) length 0 = 256"
    );
    assert_eq!(
        l.execute(&cdb(&[0x0a, 0, 0, 1, 1]), &[]),
        Outcome::Io(IoRequest::Write {
            lba: 1,
            blocks: 1,
            fua: false
        })
    );
    assert_eq!(
        l.execute(&cdb(&[0x2a, 0x08, 0, 0, 0, 7, 0, 0, 2]), &[]),
        Outcome::Io(IoRequest::Write {
            lba: 7,
            blocks: 2,
            fua: true
        })
    );
    assert_eq!(
        l.execute(&cdb(&[0xa8, 0, 0, 0, 0, 5, 0, 0, 0, 3]), &[]),
        Outcome::Io(IoRequest::Read { lba: 5, blocks: 3 })
    );
    let mut r16 = cdb(&[0x88]);
    r16[9] = 100;
    r16[13] = 8;
    assert_eq!(
        l.execute(&r16, &[]),
        Outcome::Io(IoRequest::Read {
            lba: 100,
            blocks: 8
        })
    );
    // Zero-length transfers do nothing.
    assert_eq!(
        l.execute(&cdb(&[0x28, 0, 0, 0, 0, 0, 0, 0, 0]), &[]),
        Outcome::Good
    );
}

#[test]
fn out_of_range_protected_and_oversized_io() {
    let l = lun();
    let last = (BLOCKS - 1) as u8;
    let mut r16 = cdb(&[0x88]);
    r16[2..10].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
    r16[13] = 2;
    assert_eq!(check(l.execute(&r16, &[])), Sense::LBA_OUT_OF_RANGE);
    r16[2..10].copy_from_slice(&u64::MAX.to_be_bytes());
    r16[13] = 1;
    assert_eq!(
        check(l.execute(&r16, &[])),
        Sense::LBA_OUT_OF_RANGE,
        "LBA + length overflows"
    );
    assert_eq!(
        check(l.execute(&cdb(&[0x28, 0, 0, 0, 0x08, 0, 0, 0, 1]), &[])),
        Sense::LBA_OUT_OF_RANGE
    );
    let _ = last;
    // RDPROTECT set.
    assert_eq!(
        check(l.execute(&cdb(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    // More than the maximum transfer length.
    let big = Lun::new(LunSettings {
        blocks: 1 << 30,
        ..settings()
    });
    assert_eq!(
        check(big.execute(&cdb(&[0xa8, 0, 0, 0, 0, 0, 0, 1, 0, 0]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    let ro = Lun::new(LunSettings {
        readonly: true,
        ..settings()
    });
    assert_eq!(
        check(ro.execute(&cdb(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1]), &[])),
        Sense::WRITE_PROTECTED
    );
    assert_eq!(
        ro.execute(&cdb(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1]), &[]),
        Outcome::Io(IoRequest::Read { lba: 0, blocks: 1 })
    );
}

#[test]
fn verify_and_synchronize_cache() {
    let l = lun();
    assert_eq!(
        l.execute(&cdb(&[0x2f, 0, 0, 0, 0, 0, 0, 0, 8]), &[]),
        Outcome::Good
    );
    // BYTCHK 01b: data-out holds every block.
    let data_out: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
    assert_eq!(
        l.execute(&cdb(&[0x2f, 0x02, 0, 0, 0, 4, 0, 0, 2]), &data_out),
        Outcome::Io(IoRequest::Compare {
            lba: 4,
            blocks: 2,
            expected: data_out.clone()
        })
    );
    // BYTCHK 11b: one block, compared with each.
    assert_eq!(
        l.execute(&cdb(&[0x2f, 0x06, 0, 0, 0, 4, 0, 0, 2]), &data_out[..512]),
        Outcome::Io(IoRequest::Compare {
            lba: 4,
            blocks: 2,
            expected: data_out[..512].repeat(2)
        })
    );
    assert_eq!(
        check(l.execute(&cdb(&[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 8]), &[])),
        Sense::PARAMETER_LIST_LENGTH_ERROR,
        "BYTCHK without the data"
    );
    assert_eq!(
        check(l.execute(&cdb(&[0x2f, 0x04, 0, 0, 0, 0, 0, 0, 8]), &[0; 4096])),
        Sense::INVALID_FIELD_IN_CDB,
        "BYTCHK 10b"
    );
    // The range is checked first, whatever BYTCHK says.
    assert_eq!(
        check(l.execute(&cdb(&[0x2f, 0x02, 0, 0, 0x08, 0, 0, 0, 1]), &[0; 512])),
        Sense::LBA_OUT_OF_RANGE
    );
    assert_eq!(
        check(l.execute(&cdb(&[0x2f, 0, 0, 0, 0x08, 0, 0, 0, 1]), &[])),
        Sense::LBA_OUT_OF_RANGE
    );
    assert_eq!(l.execute(&cdb(&[0x35]), &[]), Outcome::Io(IoRequest::Flush));
    assert_eq!(l.execute(&cdb(&[0x91]), &[]), Outcome::Io(IoRequest::Flush));
    assert_eq!(
        check(l.execute(&cdb(&[0x35, 0, 0, 0, 0x08, 0, 0, 0, 1]), &[])),
        Sense::LBA_OUT_OF_RANGE
    );
}

fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let desc_len = (ranges.len() * 16) as u16;
    unmap_header(desc_len + 6, desc_len, ranges)
}

/// An UNMAP parameter list whose header says what the caller wants, whatever follows it.
fn unmap_header(data_len: u16, desc_len: u16, ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    p[0..2].copy_from_slice(&data_len.to_be_bytes());
    p[2..4].copy_from_slice(&desc_len.to_be_bytes());
    for &(lba, blocks) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&blocks.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

fn unmap_cdb(len: usize) -> Vec<u8> {
    cdb(&[0x42, 0, 0, 0, 0, 0, 0, (len >> 8) as u8, len as u8])
}

/// The Block Limits VPD page's MAXIMUM UNMAP LBA COUNT and MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT.
fn unmap_limits(l: &Lun) -> (u32, u32) {
    let page = data(l.execute(&cdb(&[0x12, 1, 0xb0, 0, 64]), &[]));
    (
        u32::from_be_bytes(page[20..24].try_into().unwrap()),
        u32::from_be_bytes(page[24..28].try_into().unwrap()),
    )
}

fn unmapped(ranges: &[(u64, u32)]) -> Outcome {
    Outcome::Io(IoRequest::Unmap(ranges.to_vec()))
}

#[test]
fn unmap_parameter_list_lengths() {
    let l = lun();
    let one = unmap_list(&[(0, 8)]);
    let two = unmap_list(&[(0, 8), (100, 16)]);
    // One full descriptor and the first half of another, with the lengths saying so.
    let mut one_and_a_half = unmap_header(6 + 24, 24, &[(0, 8)]);
    one_and_a_half.extend_from_slice(&100u64.to_be_bytes());
    // (what, PARAMETER LIST LENGTH, data-out, outcome)
    let cases: Vec<(&str, usize, Vec<u8>, Outcome)> = vec![
        (
            "two descriptors",
            two.len(),
            two.clone(),
            unmapped(&[(0, 8), (100, 16)]),
        ),
        ("nothing sent", 0, vec![], Outcome::Good),
        (
            "nothing sent, whatever the buffer",
            0,
            two.clone(),
            Outcome::Good,
        ),
        (
            "block descriptor data length 24: the half descriptor is ignored",
            one_and_a_half.len(),
            one_and_a_half.clone(),
            unmapped(&[(0, 8)]),
        ),
        (
            "block descriptor data length 10: no whole descriptor",
            two.len(),
            unmap_header(16, 10, &[(0, 8), (100, 16)]),
            Outcome::Good,
        ),
        ("header alone", 8, unmap_header(6, 0, &[]), Outcome::Good),
        (
            "list length 7",
            7,
            two.clone(),
            Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR),
        ),
        (
            "list length 1",
            1,
            two.clone(),
            Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR),
        ),
        (
            "data-out shorter than the list length",
            two.len(),
            two[..20].to_vec(),
            Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR),
        ),
        (
            "data-out shorter than the header",
            8,
            two[..6].to_vec(),
            Outcome::Check(Sense::PARAMETER_LIST_LENGTH_ERROR),
        ),
        (
            "list length cuts the descriptors the header announces",
            one.len(),
            two.clone(),
            unmapped(&[(0, 8)]),
        ),
        (
            "list length cuts the second descriptor in half",
            one.len() + 8,
            two.clone(),
            unmapped(&[(0, 8)]),
        ),
        (
            "block descriptor data length larger than what was sent",
            one.len(),
            unmap_header(6 + 64, 64, &[(0, 8)]),
            unmapped(&[(0, 8)]),
        ),
        (
            "unmap data length larger than what was sent",
            one.len(),
            unmap_header(1000, 16, &[(0, 8)]),
            unmapped(&[(0, 8)]),
        ),
        (
            "unmap data length smaller than the descriptors (not used, as in LIO)",
            two.len(),
            unmap_header(0, 32, &[(0, 8), (100, 16)]),
            unmapped(&[(0, 8), (100, 16)]),
        ),
        (
            "descriptors with no blocks",
            two.len(),
            unmap_list(&[(5, 0), (BLOCKS, 0)]),
            Outcome::Good,
        ),
        (
            "last block",
            one.len(),
            unmap_list(&[(BLOCKS - 1, 1)]),
            unmapped(&[(BLOCKS - 1, 1)]),
        ),
        (
            "one block past the end",
            one.len(),
            unmap_list(&[(BLOCKS - 1, 2)]),
            Outcome::Check(Sense::LBA_OUT_OF_RANGE),
        ),
        (
            "no blocks, but starting past the end",
            one.len(),
            unmap_list(&[(BLOCKS + 1, 0)]),
            Outcome::Check(Sense::LBA_OUT_OF_RANGE),
        ),
        (
            "LBA + count overflows",
            one.len(),
            unmap_list(&[(u64::MAX, 1)]),
            Outcome::Check(Sense::LBA_OUT_OF_RANGE),
        ),
        (
            "a bad second descriptor fails the whole command",
            two.len(),
            unmap_list(&[(0, 8), (BLOCKS, 1)]),
            Outcome::Check(Sense::LBA_OUT_OF_RANGE),
        ),
        (
            "a descriptor past the list length is not looked at",
            one.len(),
            unmap_list(&[(0, 8), (BLOCKS, 1)]),
            unmapped(&[(0, 8)]),
        ),
    ];
    for (what, len, params, expected) in cases {
        assert_eq!(l.execute(&unmap_cdb(len), &params), expected, "{what}");
    }
}

#[test]
fn unmap_limits_from_the_block_limits_page() {
    let big = Lun::new(LunSettings {
        blocks: 1 << 40,
        ..settings()
    });
    let small = lun();
    let (max_blocks, max_descriptors) = unmap_limits(&big);
    assert!(max_blocks > 1 && max_descriptors > 1);
    let most: Vec<(u64, u32)> = (0..u64::from(max_descriptors))
        .map(|i| (i * 8, 1))
        .collect();
    let too_many: Vec<(u64, u32)> = (0..=u64::from(max_descriptors))
        .map(|i| (i * 8, 1))
        .collect();
    let carried = 8 + 16 * max_descriptors as usize;
    // (what, LUN, PARAMETER LIST LENGTH, data-out, outcome)
    let cases: Vec<(&str, &Lun, usize, Vec<u8>, Outcome)> = vec![
        (
            "the most descriptors",
            &big,
            carried,
            unmap_list(&most),
            unmapped(&most),
        ),
        (
            "one descriptor too many",
            &big,
            carried + 16,
            unmap_list(&too_many),
            Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST),
        ),
        (
            "one descriptor too many announced, the most carried by the list length",
            &big,
            carried,
            unmap_list(&too_many),
            unmapped(&most),
        ),
        (
            "the most blocks in one descriptor",
            &big,
            24,
            unmap_list(&[(0, max_blocks)]),
            unmapped(&[(0, max_blocks)]),
        ),
        (
            "one block too many in one descriptor",
            &big,
            24,
            unmap_list(&[(0, max_blocks + 1)]),
            Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST),
        ),
        (
            "one block too many over two descriptors",
            &big,
            40,
            unmap_list(&[(0, max_blocks), (1 << 30, 1)]),
            Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST),
        ),
        (
            "too many blocks and past the end: the limit is checked first, as in LIO",
            &small,
            24,
            unmap_list(&[(0, max_blocks + 1)]),
            Outcome::Check(Sense::INVALID_FIELD_IN_PARAMETER_LIST),
        ),
    ];
    for (what, l, len, params, expected) in cases {
        assert_eq!(l.execute(&unmap_cdb(len), &params), expected, "{what}");
    }
}

#[test]
fn unmap_refusals() {
    let l = lun();
    let p = unmap_list(&[(0, 8), (100, 16)]);
    assert_eq!(
        check(l.execute(&cdb(&[0x42, 1, 0, 0, 0, 0, 0, 0, 40]), &p)),
        Sense::INVALID_FIELD_IN_CDB,
        "ANCHOR"
    );
    let ro = Lun::new(LunSettings {
        readonly: true,
        ..settings()
    });
    assert_eq!(
        check(ro.execute(&unmap_cdb(p.len()), &p)),
        Sense::WRITE_PROTECTED
    );
    let thick = Lun::new(LunSettings {
        discard: false,
        ..settings()
    });
    assert_eq!(
        check(thick.execute(&unmap_cdb(p.len()), &p)),
        Sense::INVALID_OPCODE
    );
}

#[test]
fn write_same_variants() {
    let l = lun();
    let zero = vec![0u8; 512];
    let mut ones = vec![0u8; 512];
    ones[0] = 1;
    let ws10 = |flags: u8, blocks: u16| {
        cdb(&[
            0x41,
            flags,
            0,
            0,
            0,
            4,
            0,
            (blocks >> 8) as u8,
            blocks as u8,
        ])
    };
    assert_eq!(
        l.execute(&ws10(0, 8), &zero),
        Outcome::Io(IoRequest::WriteZeroes {
            lba: 4,
            blocks: 8,
            unmap: false
        })
    );
    assert_eq!(
        l.execute(&ws10(0x08, 8), &zero),
        Outcome::Io(IoRequest::WriteZeroes {
            lba: 4,
            blocks: 8,
            unmap: true
        })
    );
    assert_eq!(
        l.execute(&ws10(0, 8), &ones),
        Outcome::Io(IoRequest::WriteSame {
            lba: 4,
            blocks: 8,
            pattern: ones.clone()
        })
    );
    assert_eq!(
        check(l.execute(&ws10(0, 0), &zero)),
        Sense::INVALID_FIELD_IN_CDB,
        "WSNZ"
    );
    assert_eq!(
        check(l.execute(&ws10(0, 8), &zero[..100])),
        Sense::PARAMETER_LIST_LENGTH_ERROR
    );
    assert_eq!(
        check(l.execute(&ws10(0, 8), &[0u8; 1024])),
        Sense::PARAMETER_LIST_LENGTH_ERROR,
        "exactly one block of data-out"
    );
    assert_eq!(
        check(l.execute(&ws10(0x10, 8), &zero)),
        Sense::INVALID_FIELD_IN_CDB,
        "ANCHOR"
    );
    let mut ws16 = cdb(&[0x93, 0x09]);
    ws16[9] = 9;
    ws16[13] = 3;
    assert_eq!(
        l.execute(&ws16, &[]),
        Outcome::Io(IoRequest::WriteZeroes {
            lba: 9,
            blocks: 3,
            unmap: true
        }),
        "NDOB"
    );
    ws16[9] = 0;
    ws16[2..10].copy_from_slice(&(BLOCKS - 1).to_be_bytes());
    assert_eq!(check(l.execute(&ws16, &[])), Sense::LBA_OUT_OF_RANGE);
    // Where the backing store cannot zero a range itself, zeroes are written as data,
    // UNMAP or not, and NDOB too.
    let no_rz = Lun::new(LunSettings {
        unmapped_reads_zero: false,
        ..settings()
    });
    let written_zeroes = |lba, blocks| {
        Outcome::Io(IoRequest::WriteSame {
            lba,
            blocks,
            pattern: zero.clone(),
        })
    };
    assert_eq!(no_rz.execute(&ws10(0x08, 8), &zero), written_zeroes(4, 8));
    assert_eq!(no_rz.execute(&ws10(0, 8), &zero), written_zeroes(4, 8));
    ws16[2..10].copy_from_slice(&9u64.to_be_bytes());
    assert_eq!(no_rz.execute(&ws16, &[]), written_zeroes(9, 3), "NDOB");
}

#[test]
fn mode_sense_pages_headers_and_truncation() {
    let l = lun();
    let d = data(l.execute(&cdb(&[0x1a, 0, 0x08, 0, 255]), &[]));
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(d[2] & 0x80, 0, "not write protected");
    assert_eq!(d[3], 8, "block descriptor");
    assert_eq!(&d[9..12], &[0, 2, 0], "block length 512");
    assert_eq!(d[12], 0x08, "caching page");
    assert_eq!(d[14] & 0x04, 0x04, "WCE reflects the write cache");
    let d = data(l.execute(&cdb(&[0x1a, 0x08, 0x3f, 0, 255]), &[]));
    assert_eq!(d[3], 0, "DBD");
    assert_eq!(d.len(), 4 + 20 + 12, "caching and control pages");
    let d = data(l.execute(&cdb(&[0x5a, 0, 0x0a, 0, 0, 0, 0, 0, 255]), &[]));
    assert_eq!(u16::from_be_bytes([d[0], d[1]]) as usize, d.len() - 2);
    assert_eq!(u16::from_be_bytes([d[6], d[7]]), 8);
    assert_eq!(d[16], 0x0a, "control page");
    let d = data(l.execute(&cdb(&[0x1a, 0, 0x3f, 0, 4]), &[]));
    assert_eq!(d.len(), 4, "truncated");
    // Changeable values: nothing can change.
    let d = data(l.execute(&cdb(&[0x1a, 0x08, 0x48, 0, 255]), &[]));
    assert_eq!(d[6] & 0x04, 0);
    assert_eq!(
        check(l.execute(&cdb(&[0x1a, 0, 0xc8, 0, 255]), &[])),
        Sense::SAVING_PARAMETERS_NOT_SUPPORTED
    );
    assert_eq!(
        check(l.execute(&cdb(&[0x1a, 0, 0x19, 0, 255]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    let ro = Lun::new(LunSettings {
        readonly: true,
        write_cache: false,
        ..settings()
    });
    let d = data(ro.execute(&cdb(&[0x1a, 0, 0x08, 0, 255]), &[]));
    assert_eq!(d[2] & 0x80, 0x80, "WP");
    assert_eq!(d[14] & 0x04, 0, "WCE off");
}

#[test]
fn mode_select_accepts_only_current_values() {
    let l = lun();
    let current = data(l.execute(&cdb(&[0x1a, 0x08, 0x08, 0, 255]), &[]));
    let mut list = vec![0u8; 4];
    list.extend_from_slice(&current[4..]);
    let select = |len: usize| cdb(&[0x15, 0x10, 0, 0, len as u8]);
    assert_eq!(l.execute(&select(list.len()), &list), Outcome::Good);
    let mut changed = list.clone();
    changed[6] ^= 0x04; // flip WCE
    assert_eq!(
        check(l.execute(&select(changed.len()), &changed)),
        Sense::INVALID_FIELD_IN_PARAMETER_LIST
    );
    assert_eq!(
        check(l.execute(&select(list.len()), &list[..5])),
        Sense::PARAMETER_LIST_LENGTH_ERROR
    );
    assert_eq!(
        check(l.execute(&cdb(&[0x15, 0x11, 0, 0, list.len() as u8]), &list)),
        Sense::SAVING_PARAMETERS_NOT_SUPPORTED
    );
    assert_eq!(
        check(l.execute(&cdb(&[0x15, 0x00, 0, 0, list.len() as u8]), &list)),
        Sense::INVALID_FIELD_IN_CDB,
        "PF clear"
    );
    assert_eq!(l.execute(&select(0), &[]), Outcome::Good);
}

#[test]
fn report_luns_lists_all_and_truncates() {
    let luns = [0u16, 1, 2, 300];
    let d = data(report_luns(&cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 1, 0]), &luns));
    assert_eq!(u32::from_be_bytes(d[0..4].try_into().unwrap()), 32);
    assert_eq!(&d[8..16], &[0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(&d[16..18], &[0, 1]);
    assert_eq!(&d[32..34], &[0x41, 0x2c], "flat addressing above 255");
    let d = data(report_luns(
        &cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16]),
        &luns,
    ));
    assert_eq!(d.len(), 16, "truncated to the allocation length");
    assert_eq!(
        u32::from_be_bytes(d[0..4].try_into().unwrap()),
        32,
        "full list length kept"
    );
    assert_eq!(
        check(report_luns(&cdb(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 8]), &luns)),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(report_luns(
            &cdb(&[0xa0, 0, 0x05, 0, 0, 0, 0, 0, 1, 0]),
            &luns
        )),
        Sense::INVALID_FIELD_IN_CDB
    );
    let d = data(report_luns(
        &cdb(&[0xa0, 0, 0x01, 0, 0, 0, 0, 0, 1, 0]),
        &luns,
    ));
    assert_eq!(
        u32::from_be_bytes(d[0..4].try_into().unwrap()),
        0,
        "no well-known LUNs"
    );
}

#[test]
fn report_supported_operation_codes() {
    let l = lun();
    let all = data(l.execute(&cdb(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 4, 0]), &[]));
    let len = u32::from_be_bytes(all[0..4].try_into().unwrap()) as usize;
    assert_eq!(len % 8, 0);
    let ops: Vec<u8> = all[4..].chunks(8).map(|c| c[0]).collect();
    for op in [0x28u8, 0x2a, 0x42, 0x93, 0x12, 0xa0] {
        assert!(ops.contains(&op), "{op:#x} missing from {ops:x?}");
    }
    let one = data(l.execute(&cdb(&[0xa3, 0x0c, 1, 0x28, 0, 0, 0, 0, 0, 64]), &[]));
    assert_eq!(one[1] & 0x07, 3, "READ(10) supported");
    assert_eq!(u16::from_be_bytes([one[2], one[3]]), 10);
    let none = data(l.execute(&cdb(&[0xa3, 0x0c, 1, 0xee, 0, 0, 0, 0, 0, 64]), &[]));
    assert_eq!(none[1] & 0x07, 1, "unknown opcode not supported");
    assert_eq!(
        check(l.execute(&cdb(&[0xa3, 0x0c, 2, 0x28, 0, 0, 0, 0, 0, 64]), &[])),
        Sense::INVALID_FIELD_IN_CDB,
        "option 2 on an opcode without service actions"
    );
    let sa = data(l.execute(&cdb(&[0xa3, 0x0c, 2, 0x9e, 0, 0x10, 0, 0, 0, 64]), &[]));
    assert_eq!(sa[1] & 0x07, 3, "READ CAPACITY(16) by service action");
    assert_eq!(
        check(l.execute(&cdb(&[0xa3, 0x0c, 1, 0x9e, 0, 0, 0, 0, 0, 64]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(
        check(l.execute(&cdb(&[0xa3, 0x0c, 7, 0, 0, 0, 0, 0, 0, 64]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    let cut = data(l.execute(&cdb(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0, 6]), &[]));
    assert_eq!(cut.len(), 6);
}

#[test]
fn request_sense_and_start_stop() {
    let d = data(lun().execute(&cdb(&[0x03, 0, 0, 0, 252]), &[]));
    assert_eq!(d.len(), 18);
    assert_eq!((d[0], d[2]), (0x70, 0));
    assert_eq!(data(lun().execute(&cdb(&[0x03, 0, 0, 0, 8]), &[])).len(), 8);
    assert_eq!(
        check(lun().execute(&cdb(&[0x03, 1, 0, 0, 252]), &[])),
        Sense::INVALID_FIELD_IN_CDB
    );
    assert_eq!(lun().execute(&cdb(&[0x1b, 0, 0, 0, 1]), &[]), Outcome::Good);
}

/// REPORT SUPPORTED OPERATION CODES with an allocation length that holds any answer.
fn rsoc(l: &Lun, rctd: bool, options: u8, opcode: u8, service_action: u16) -> Outcome {
    let mut c = cdb(&[0xa3, 0x0c, options | if rctd { 0x80 } else { 0 }, opcode]);
    c[4..6].copy_from_slice(&service_action.to_be_bytes());
    c[6..10].copy_from_slice(&0xffffu32.to_be_bytes());
    l.execute(&c, &[])
}

/// One command descriptor of the all_commands parameter data (SPC-4 6.35.2).
#[derive(Debug)]
struct Listed {
    opcode: u8,
    service_action: u16,
    servactv: bool,
    ctdp: bool,
    cdb_len: usize,
    timeouts: Vec<u8>,
}

fn all_commands(l: &Lun, rctd: bool) -> Vec<Listed> {
    let d = data(rsoc(l, rctd, 0, 0, 0));
    let len = u32::from_be_bytes(d[0..4].try_into().unwrap()) as usize;
    assert_eq!(d.len(), 4 + len, "COMMAND DATA LENGTH");
    let mut listed = Vec::new();
    let mut at = 4;
    while at < d.len() {
        let flags = d[at + 5];
        let mut c = Listed {
            opcode: d[at],
            service_action: u16::from_be_bytes([d[at + 2], d[at + 3]]),
            servactv: flags & 0x01 != 0,
            ctdp: flags & 0x02 != 0,
            cdb_len: usize::from(u16::from_be_bytes([d[at + 6], d[at + 7]])),
            timeouts: Vec::new(),
        };
        at += 8;
        if c.ctdp {
            c.timeouts = d[at..at + 12].to_vec();
            at += 12;
        }
        listed.push(c);
    }
    assert_eq!(at, d.len(), "descriptors fill the list exactly");
    listed
}

/// The CDB usage map of a supported command (one_command format, SPC-4 6.35.3).
fn usage_map(l: &Lun, opcode: u8, service_action: Option<u16>) -> Vec<u8> {
    let d = match service_action {
        None => data(rsoc(l, false, 1, opcode, 0)),
        Some(sa) => data(rsoc(l, false, 2, opcode, sa)),
    };
    assert_eq!(d[1] & 0x07, 0b011, "{opcode:#04x} supported");
    let size = usize::from(u16::from_be_bytes([d[2], d[3]]));
    assert_eq!(
        d.len(),
        4 + size,
        "{opcode:#04x}: CDB SIZE bytes of usage data"
    );
    d[4..].to_vec()
}

#[test]
fn rsoc_usage_maps_show_what_is_evaluated() {
    let l = lun();
    let c = 0x04; // CONTROL: NACA (refused) only
                  // (command, opcode, service action, CDB USAGE DATA)
    let cases: &[(&str, u8, Option<u16>, &[u8])] = &[
        ("TEST UNIT READY", 0x00, None, &[0x00, 0, 0, 0, 0, c]),
        ("REQUEST SENSE", 0x03, None, &[0x03, 0x01, 0, 0, 0xff, c]),
        ("READ(6)", 0x08, None, &[0x08, 0x1f, 0xff, 0xff, 0xff, c]),
        ("INQUIRY", 0x12, None, &[0x12, 0x03, 0xff, 0xff, 0xff, c]),
        ("MODE SELECT(6)", 0x15, None, &[0x15, 0x11, 0, 0, 0xff, c]),
        ("START STOP UNIT", 0x1b, None, &[0x1b, 0, 0, 0, 0, c]),
        (
            "READ CAPACITY(10)",
            0x25,
            None,
            &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, c],
        ),
        (
            "READ(10)",
            0x28,
            None,
            &[0x28, 0xf8, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, c],
        ),
        (
            "WRITE(10)",
            0x2a,
            None,
            &[0x2a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, c],
        ),
        (
            "VERIFY(10)",
            0x2f,
            None,
            &[0x2f, 0xf6, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, c],
        ),
        (
            "SYNCHRONIZE CACHE(10)",
            0x35,
            None,
            &[0x35, 0, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, c],
        ),
        (
            "WRITE SAME(10)",
            0x41,
            None,
            &[0x41, 0xfe, 0xff, 0xff, 0xff, 0xff, 0, 0xff, 0xff, c],
        ),
        (
            "UNMAP",
            0x42,
            None,
            &[0x42, 0x01, 0, 0, 0, 0, 0, 0xff, 0xff, c],
        ),
        (
            "MODE SENSE(10)",
            0x5a,
            None,
            &[0x5a, 0x08, 0xff, 0xff, 0, 0, 0, 0xff, 0xff, c],
        ),
        (
            "READ(16)",
            0x88,
            None,
            &[
                0x88, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0, c,
            ],
        ),
        (
            "WRITE(16)",
            0x8a,
            None,
            &[
                0x8a, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0, c,
            ],
        ),
        (
            "SYNCHRONIZE CACHE(16)",
            0x91,
            None,
            &[
                0x91, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0,
                c,
            ],
        ),
        (
            "WRITE SAME(16)",
            0x93,
            None,
            &[
                0x93, 0xf9, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                0, c,
            ],
        ),
        (
            "READ CAPACITY(16)",
            0x9e,
            Some(0x10),
            &[
                0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, c,
            ],
        ),
        (
            "REPORT LUNS",
            0xa0,
            None,
            &[0xa0, 0, 0xff, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, c],
        ),
        (
            "REPORT SUPPORTED OPERATION CODES",
            0xa3,
            Some(0x0c),
            &[
                0xa3, 0x0c, 0x87, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, c,
            ],
        ),
        (
            "READ(12)",
            0xa8,
            None,
            &[
                0xa8, 0xf8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, c,
            ],
        ),
    ];
    for &(name, opcode, service_action, usage) in cases {
        let options = if service_action.is_some() { 2 } else { 1 };
        let mut expected = vec![0, 0b011];
        expected.extend_from_slice(&(usage.len() as u16).to_be_bytes());
        expected.extend_from_slice(usage);
        assert_eq!(
            data(rsoc(
                &l,
                false,
                options,
                opcode,
                service_action.unwrap_or(0)
            )),
            expected,
            "{name}"
        );
    }
}

#[test]
fn rsoc_every_command_reports_its_cdb() {
    let l = lun();
    let listed = all_commands(&l, false);
    assert!(listed.len() > 20, "{listed:x?}");
    for (i, c) in listed.iter().enumerate() {
        let name = format!("{:#04x}/{:#04x}", c.opcode, c.service_action);
        assert!(
            !c.ctdp && c.timeouts.is_empty(),
            "{name}: no timeouts without RCTD"
        );
        assert!(
            listed[..i]
                .iter()
                .all(|o| (o.opcode, o.service_action) != (c.opcode, c.service_action)),
            "{name} listed once"
        );
        assert_eq!(
            Some(c.cdb_len),
            cdb_length(c.opcode),
            "{name}: CDB LENGTH of the opcode's group"
        );
        if !c.servactv {
            assert_eq!(
                c.service_action, 0,
                "{name}: SERVACTV clear, no service action"
            );
        }
        let usage = usage_map(&l, c.opcode, c.servactv.then_some(c.service_action));
        assert_eq!(
            usage.len(),
            c.cdb_len,
            "{name}: usage map as long as the CDB"
        );
        assert_eq!(
            usage[0], c.opcode,
            "{name}: usage map starts with the opcode"
        );
        if c.servactv {
            assert_eq!(
                u16::from(usage[1] & 0x1f),
                c.service_action,
                "{name}: service action in its field"
            );
        }
        assert_eq!(
            usage[c.cdb_len - 1],
            0x04,
            "{name}: CONTROL byte, NACA evaluated"
        );
        // Asking for it in the form it does not have is an error (SPC-4 6.35.1).
        let wrong = if c.servactv { 1 } else { 2 };
        assert_eq!(
            check(rsoc(&l, false, wrong, c.opcode, c.service_action)),
            Sense::INVALID_FIELD_IN_CDB,
            "{name}: reporting options {wrong}"
        );
    }
}

#[test]
fn rsoc_lists_exactly_what_the_dispatch_runs() {
    let variants = [
        ("thin", settings()),
        (
            "without discard",
            LunSettings {
                discard: false,
                ..settings()
            },
        ),
        (
            "read-only",
            LunSettings {
                readonly: true,
                ..settings()
            },
        ),
    ];
    for (variant, s) in variants {
        let l = Lun::new(s.clone());
        let listed = all_commands(&l, false);
        assert_eq!(
            listed.iter().any(|c| c.opcode == 0x42),
            s.discard,
            "{variant}: UNMAP listed only with discard"
        );
        for opcode in 0..=255u8 {
            let with_sa: Vec<u16> = listed
                .iter()
                .filter(|c| c.opcode == opcode && c.servactv)
                .map(|c| c.service_action)
                .collect();
            let is_listed = listed.iter().any(|c| c.opcode == opcode);
            let ran = l.execute(&cdb(&[opcode]), &[]);
            assert_eq!(
                ran != Outcome::Check(Sense::INVALID_OPCODE),
                is_listed,
                "{variant}: {opcode:#04x} runs iff listed (ran {ran:?})"
            );
            if !is_listed {
                let one = data(rsoc(&l, false, 1, opcode, 0));
                assert_eq!(
                    one,
                    vec![0, 0b001, 0, 0],
                    "{variant}: {opcode:#04x} not supported"
                );
            }
            if with_sa.is_empty() {
                continue;
            }
            // Every other service action of the opcode: not reported, and refused as an
            // invalid field (the operation code itself is supported).
            for sa in 0..0x20u16 {
                let ran = l.execute(&cdb(&[opcode, sa as u8]), &[]);
                let one = data(rsoc(&l, false, 2, opcode, sa));
                if with_sa.contains(&sa) {
                    assert!(
                        !matches!(ran, Outcome::Check(_)),
                        "{variant}: {opcode:#04x}/{sa:#04x} runs: {ran:?}"
                    );
                    assert_eq!(one[1] & 0x07, 0b011);
                } else {
                    assert_eq!(
                        ran,
                        Outcome::Check(Sense::INVALID_FIELD_IN_CDB),
                        "{variant}: {opcode:#04x}/{sa:#04x}"
                    );
                    assert_eq!(
                        one,
                        vec![0, 0b001, 0, 0],
                        "{variant}: {opcode:#04x}/{sa:#04x}"
                    );
                }
            }
        }
    }
}

#[test]
fn rsoc_rctd_adds_command_timeouts_descriptors() {
    let l = lun();
    let plain = all_commands(&l, false);
    let timed = all_commands(&l, true);
    assert_eq!(timed.len(), plain.len());
    let no_timeout = [0x00, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    for (p, t) in plain.iter().zip(&timed) {
        assert_eq!(
            (t.opcode, t.service_action, t.servactv, t.cdb_len),
            (p.opcode, p.service_action, p.servactv, p.cdb_len)
        );
        assert!(t.ctdp, "{:#04x}: CTDP", t.opcode);
        assert_eq!(t.timeouts, no_timeout, "{:#04x}", t.opcode);
    }
    // One command: CTDP, the usage map, then the descriptor.
    let one = data(rsoc(&l, true, 1, 0x28, 0));
    assert_eq!(one[1], 0x80 | 0b011);
    assert_eq!(one.len(), 4 + 10 + 12);
    assert_eq!(&one[4..14], usage_map(&l, 0x28, None).as_slice());
    assert_eq!(&one[14..], &no_timeout);
    let one = data(rsoc(&l, true, 2, 0x9e, 0x10));
    assert_eq!((one[1], one.len()), (0x80 | 0b011, 4 + 16 + 12));
    // Not supported: no descriptor, CTDP clear.
    assert_eq!(data(rsoc(&l, true, 1, 0xee, 0)), vec![0, 0b001, 0, 0]);
    // REPORTING OPTIONS other than 000b, 001b and 010b.
    for options in 3..8 {
        assert_eq!(
            check(rsoc(&l, false, options, 0x28, 0)),
            Sense::INVALID_FIELD_IN_CDB,
            "reporting options {options:03b}"
        );
    }
}

/// What the transport answers: [`Lun::execute`], with REPORT LUNS filled in for a target
/// with three LUNs.
fn run(l: &Lun, cdb: &[u8], params: &[u8]) -> Outcome {
    match l.execute(cdb, params) {
        Outcome::ReportLuns => report_luns(cdb, &[0, 1, 300]),
        other => other,
    }
}

/// A CDB and its data-out.
type Request = (Vec<u8>, Vec<u8>);

/// Good CDBs for each supported command (by opcode and service action), chosen so that
/// changing any field the command evaluates changes the outcome for at least one of them.
fn base_commands(l: &Lun) -> Vec<((u8, u16), Vec<Request>)> {
    let c = |bytes: &[u8]| cdb(bytes);
    let c16 = |op: u8, flags: u8, lba: u64, count: u32| {
        let mut v = cdb(&[op, flags]);
        v[2..10].copy_from_slice(&lba.to_be_bytes());
        v[10..14].copy_from_slice(&count.to_be_bytes());
        v
    };
    let block = vec![0u8; 512];
    let ones = vec![0xffu8; 512];
    let caching = data(l.execute(&cdb(&[0x1a, 0x08, 0x08, 0, 255]), &[]))[4..].to_vec();
    let mut select6 = vec![0u8; 4];
    select6.extend_from_slice(&caching);
    let mut select10 = vec![0u8; 8];
    select10.extend_from_slice(&caching);
    let none = Vec::new;
    vec![
        ((0x00, 0), vec![(c(&[0x00]), none())]),
        ((0x03, 0), vec![(c(&[0x03, 0, 0, 0, 0]), none())]),
        ((0x08, 0), vec![(c(&[0x08, 0, 0, 0, 1]), none())]),
        ((0x0a, 0), vec![(c(&[0x0a, 0, 0, 0, 1]), none())]),
        (
            (0x12, 0),
            vec![
                (c(&[0x12, 0, 0, 0, 0]), none()),
                (c(&[0x12, 0, 0, 0, 0xff]), none()),
            ],
        ),
        (
            (0x15, 0),
            vec![(c(&[0x15, 0x10, 0, 0, select6.len() as u8]), select6.clone())],
        ),
        (
            (0x1a, 0),
            vec![
                (c(&[0x1a, 0, 0x08, 0, 0]), none()),
                (c(&[0x1a, 0, 0x08, 0, 0xff]), none()),
                (c(&[0x1a, 0, 0x48, 0, 0xff]), none()),
            ],
        ),
        ((0x1b, 0), vec![(c(&[0x1b]), none())]),
        ((0x25, 0), vec![(c(&[0x25]), none())]),
        (
            (0x28, 0),
            vec![(c(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1]), none())],
        ),
        (
            (0x2a, 0),
            vec![(c(&[0x2a, 0, 0, 0, 0, 0, 0, 0, 1]), none())],
        ),
        (
            (0x2f, 0),
            vec![
                (c(&[0x2f, 0, 0, 0, 0, 0, 0, 0, 1]), none()),
                (c(&[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1]), block.clone()),
            ],
        ),
        (
            (0x35, 0),
            vec![
                (c(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0]), none()),
                (c(&[0x35, 0, 0, 0, 0, 0, 0, 0x08, 0]), none()),
                (c(&[0x35, 0, 0, 0, 0, 1, 0, 0, 0]), none()),
            ],
        ),
        (
            (0x41, 0),
            vec![(c(&[0x41, 0, 0, 0, 0, 0, 0, 0, 1]), block.clone())],
        ),
        ((0x42, 0), vec![(unmap_cdb(24), unmap_list(&[(0, 8)]))]),
        (
            (0x55, 0),
            vec![(
                c(&[0x55, 0x10, 0, 0, 0, 0, 0, 0, select10.len() as u8]),
                select10.clone(),
            )],
        ),
        (
            (0x5a, 0),
            vec![
                (c(&[0x5a, 0, 0x08, 0, 0, 0, 0, 0, 0]), none()),
                (c(&[0x5a, 0, 0x08, 0, 0, 0, 0, 0, 0xff]), none()),
                (c(&[0x5a, 0, 0x48, 0, 0, 0, 0, 0, 0xff]), none()),
            ],
        ),
        ((0x88, 0), vec![(c16(0x88, 0, 0, 1), none())]),
        ((0x8a, 0), vec![(c16(0x8a, 0, 0, 1), none())]),
        (
            (0x8f, 0),
            vec![
                (c16(0x8f, 0, 0, 1), none()),
                (c16(0x8f, 0x02, 0, 1), block.clone()),
            ],
        ),
        (
            (0x91, 0),
            vec![
                (c16(0x91, 0, 0, 0), none()),
                (c16(0x91, 0, 0, BLOCKS as u32), none()),
                (c16(0x91, 0, 1, 0), none()),
            ],
        ),
        (
            (0x93, 0),
            vec![
                (c16(0x93, 0, 0, 1), block.clone()),
                (c16(0x93, 0, 0, 1), ones.clone()),
            ],
        ),
        ((0x9e, 0x10), vec![(c16(0x9e, 0x10, 0, 0), none())]),
        (
            (0xa0, 0),
            vec![
                (c(&[0xa0, 0, 0, 0, 0, 0, 0, 0, 0, 16]), none()),
                (c(&[0xa0, 0, 1, 0, 0, 0, 0, 0, 0, 16]), none()),
            ],
        ),
        (
            (0xa3, 0x0c),
            vec![
                (c(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0]), none()),
                (c(&[0xa3, 0x0c, 0, 0, 0, 0, 0, 0, 0xff, 0xff]), none()),
                (c(&[0xa3, 0x0c, 1, 0x00, 0, 0, 0, 0, 0xff, 0xff]), none()),
                (c(&[0xa3, 0x0c, 2, 0x9e, 0, 0x10, 0, 0, 0xff, 0xff]), none()),
            ],
        ),
        (
            (0xa8, 0),
            vec![(c(&[0xa8, 0, 0, 0, 0, 0, 0, 0, 0, 1]), none())],
        ),
        (
            (0xaa, 0),
            vec![(c(&[0xaa, 0, 0, 0, 0, 0, 0, 0, 0, 1]), none())],
        ),
    ]
}

/// For every supported command and every bit of its CDB: a bit the usage map shows as zero
/// changes no outcome when set (nor does anything past the CDB), and a bit it shows as one
/// changes the outcome of at least one good command.
#[test]
fn usage_maps_agree_with_what_the_emulation_checks() {
    let l = lun();
    let bases = base_commands(&l);
    let listed: Vec<(u8, u16)> = all_commands(&l, false)
        .iter()
        .map(|c| (c.opcode, c.service_action))
        .collect();
    let covered: Vec<(u8, u16)> = bases.iter().map(|(k, _)| *k).collect();
    assert_eq!(covered, listed, "a base CDB for every supported command");
    for ((opcode, sa), cdbs) in &bases {
        let name = format!("{opcode:#04x}/{sa:#04x}");
        let usage = usage_map(&l, *opcode, (*sa != 0).then_some(*sa));
        let outcomes: Vec<Outcome> = cdbs.iter().map(|(c, p)| run(&l, c, p)).collect();
        for (o, (c, _)) in outcomes.iter().zip(cdbs) {
            assert!(
                !matches!(o, Outcome::Check(_)),
                "{name}: base {c:x?} is good: {o:?}"
            );
        }
        for byte in 1..32 {
            for bit in 0..8 {
                let mask = 1u8 << bit;
                if *sa != 0 && byte == 1 && mask & 0x1f != 0 {
                    continue; // the service action field: it names the command
                }
                let evaluated = usage.get(byte).is_some_and(|u| u & mask != 0);
                let mut changed = false;
                for ((c, p), base) in cdbs.iter().zip(&outcomes) {
                    let mut flipped = c.clone();
                    flipped[byte] ^= mask;
                    let o = run(&l, &flipped, p);
                    if !evaluated {
                        assert_eq!(
                            &o, base,
                            "{name}: byte {byte} bit {bit} is not evaluated, yet changes {c:x?}"
                        );
                    }
                    changed |= &o != base;
                }
                // DPO and FUA on reads, DPO on writes and verifies: supported because MODE
                // SENSE reports DPOFUA (SBC-4), with no effect an outcome here can show.
                let hint = byte == 1
                    && matches!(
                        opcode,
                        0x28 | 0x2a | 0x2f | 0x88 | 0x8a | 0x8f | 0xa8 | 0xaa
                    )
                    && mask & 0x18 != 0;
                if evaluated && !hint {
                    assert!(
                        changed,
                        "{name}: byte {byte} bit {bit} is claimed evaluated, yet changes nothing"
                    );
                }
            }
        }
    }
}
