//! virtio-blk requests over the raw frontend (queue 0): a header at [`HEADER`], data at
//! [`DATA`], the status byte at [`STATUS`].

use std::time::Duration;

use virtio_bindings::bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use vvu_transport::split_ring::Buffer;

use crate::frontend::{RawFrontend, DATA_START};

/// Guest address of the request header (`virtio_blk_outhdr`).
pub const HEADER: u64 = DATA_START;
/// Guest address of data buffers (up to 8 MiB).
pub const DATA: u64 = DATA_START + 0x1000;
/// Guest address of the status byte.
pub const STATUS: u64 = DATA_START + 0x80_0000;
const TIMEOUT: Duration = Duration::from_secs(60);

/// Writes a request header and runs `buffers` on queue 0; returns `(used_len, status)`.
pub fn request(
    fe: &mut RawFrontend,
    request_type: u32,
    sector: u64,
    buffers: &[Buffer],
) -> (u32, u8) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    fe.write_mem(HEADER, &h);
    fe.write_mem(STATUS, &[0xee]);
    let head = fe.submit(buffers);
    let (used_head, len) = fe.wait_used(TIMEOUT);
    assert_eq!(used_head, head);
    (len, fe.read_mem(STATUS, 1)[0])
}

/// Reads `len` bytes at `sector` into [`DATA`].
pub fn read(fe: &mut RawFrontend, sector: u64, len: u32) -> (u32, u8) {
    request(
        fe,
        VIRTIO_BLK_T_IN,
        sector,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::writable(DATA, len),
            Buffer::writable(STATUS, 1),
        ],
    )
}

/// Writes `len` bytes at `sector` from [`DATA`].
pub fn write(fe: &mut RawFrontend, sector: u64, len: u32) -> (u32, u8) {
    request(
        fe,
        VIRTIO_BLK_T_OUT,
        sector,
        &[
            Buffer::readable(HEADER, 16),
            Buffer::readable(DATA, len),
            Buffer::writable(STATUS, 1),
        ],
    )
}
