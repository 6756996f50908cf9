//! virtio-blk request statuses (virtio 1.2 §5.2.6): the status byte values by name, and the
//! one mapping from why a request did not succeed ([`BlkError`]: refused before any I/O,
//! or its disk I/O failed) to the status the driver gets and the reason it counts under,
//! as SCSI has its one mapping to sense data.

use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};

use crate::stats::Failure;

/// The status byte values (`virtio_blk_req.status`).
pub mod status {
    use super::*;

    /// The request succeeded.
    pub const OK: u8 = VIRTIO_BLK_S_OK as u8;
    /// The request failed (device or driver error).
    pub const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    /// The request is not supported by the device.
    pub const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
}

/// Why a request did not succeed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkError {
    /// Refused before any disk I/O.
    Refused(Refusal),
    /// Its disk I/O failed with this `-errno` (or moved fewer bytes: `-EIO`).
    Io(i32),
    /// A bounced read's data could not be copied into the guest's buffers.
    BounceCopy,
}

impl BlkError {
    /// The status byte the driver gets.
    pub fn status(self) -> u8 {
        match self {
            BlkError::Refused(refusal) => refusal.status(),
            BlkError::Io(_) | BlkError::BounceCopy => status::IOERR,
        }
    }

    /// The reason the request counts under (metric label `reason`).
    pub fn failure(self) -> Failure {
        match self {
            BlkError::Refused(refusal) => refusal.failure(),
            BlkError::Io(_) => Failure::IoError,
            BlkError::BounceCopy => Failure::Invalid,
        }
    }
}

/// Why a request is answered without disk I/O. [`Refusal::status`] is the one table of the
/// status each gets: the virtio spec's where it names one (virtio 1.2 §5.2.6.2), otherwise
/// that of QEMU's virtio-blk handler (`block/export/virtio-blk-handler.c`, which
/// qemu-storage-daemon serves vhost-user-blk with), so drivers and QEMU's tests see the
/// same answers from both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The chain breaks virtio framing: a device-readable descriptor after a writable one,
    /// or more descriptors than `seg_max` + 2.
    MalformedChain,
    /// The request header (`virtio_blk_outhdr`, 16 bytes) is short or unreadable.
    ShortHeader,
    /// A read's data buffers are device-readable, or a write's are device-writable.
    WrongDirection,
    /// A write, discard or write-zeroes on a read-only device (spec: "MUST set the status
    /// byte to VIRTIO_BLK_S_IOERR for a write request if VIRTIO_BLK_F_RO is offered").
    ReadOnly,
    /// The sector range is not aligned to the logical block size or ends past capacity.
    OutOfRange,
    /// More data than `size_max` × `seg_max` bytes.
    TooLarge,
    /// A request type the device does not implement (spec: VIRTIO_BLK_S_UNSUPP).
    UnknownType,
    /// A discard or write-zeroes with more segments than `max_discard_seg` /
    /// `max_write_zeroes_seg` (QEMU: VIRTIO_BLK_S_UNSUPP).
    TooManySegments,
    /// A discard or write-zeroes whose segment (`virtio_blk_discard_write_zeroes`,
    /// 16 bytes) is short or unreadable.
    ShortSegment,
    /// Unknown flags in a discard or write-zeroes segment, or UNMAP on a discard (spec:
    /// VIRTIO_BLK_S_UNSUPP).
    UnknownFlags,
    /// A segment covers more sectors than `max_discard_sectors` /
    /// `max_write_zeroes_sectors`.
    TooManySectors,
    /// An operation whose feature the device did not offer (write-zeroes where ranges
    /// cannot be zeroed).
    NotOffered,
    /// The guest memory a request names cannot be reached or a bounce buffer cannot be
    /// allocated.
    BadMemory,
    /// The queue's disk context would not take the operation (logged).
    DiskQueue,
}

impl Refusal {
    /// Every refusal, in declaration order (`Refusal as usize` indexes this).
    pub const ALL: [Refusal; 14] = [
        Refusal::MalformedChain,
        Refusal::ShortHeader,
        Refusal::WrongDirection,
        Refusal::ReadOnly,
        Refusal::OutOfRange,
        Refusal::TooLarge,
        Refusal::UnknownType,
        Refusal::TooManySegments,
        Refusal::ShortSegment,
        Refusal::UnknownFlags,
        Refusal::TooManySectors,
        Refusal::NotOffered,
        Refusal::BadMemory,
        Refusal::DiskQueue,
    ];

    /// snake_case name (a metric label value).
    pub fn name(self) -> &'static str {
        match self {
            Refusal::MalformedChain => "malformed_chain",
            Refusal::ShortHeader => "short_header",
            Refusal::WrongDirection => "wrong_direction",
            Refusal::ReadOnly => "read_only",
            Refusal::OutOfRange => "out_of_range",
            Refusal::TooLarge => "too_large",
            Refusal::UnknownType => "unknown_type",
            Refusal::TooManySegments => "too_many_segments",
            Refusal::ShortSegment => "short_segment",
            Refusal::UnknownFlags => "unknown_flags",
            Refusal::TooManySectors => "too_many_sectors",
            Refusal::NotOffered => "not_offered",
            Refusal::BadMemory => "bad_memory",
            Refusal::DiskQueue => "disk_queue",
        }
    }

    /// The virtio-blk status byte the driver gets.
    pub fn status(self) -> u8 {
        match self {
            Refusal::UnknownType
            | Refusal::TooManySegments
            | Refusal::UnknownFlags
            | Refusal::NotOffered => status::UNSUPP,
            Refusal::MalformedChain
            | Refusal::ShortHeader
            | Refusal::WrongDirection
            | Refusal::ReadOnly
            | Refusal::OutOfRange
            | Refusal::TooLarge
            | Refusal::ShortSegment
            | Refusal::TooManySectors
            | Refusal::BadMemory
            | Refusal::DiskQueue => status::IOERR,
        }
    }

    /// The failure reason a refused request counts under (metric label `reason`).
    pub fn failure(self) -> Failure {
        match self {
            Refusal::ReadOnly => Failure::ReadOnly,
            Refusal::UnknownType
            | Refusal::TooManySegments
            | Refusal::UnknownFlags
            | Refusal::NotOffered => Failure::Unsupported,
            Refusal::DiskQueue => Failure::IoError,
            Refusal::MalformedChain
            | Refusal::ShortHeader
            | Refusal::WrongDirection
            | Refusal::OutOfRange
            | Refusal::TooLarge
            | Refusal::ShortSegment
            | Refusal::TooManySectors
            | Refusal::BadMemory => Failure::Invalid,
        }
    }

    /// The driver broke the virtio framing (counted as malformed, not as an I/O error).
    pub fn is_malformed(self) -> bool {
        matches!(
            self,
            Refusal::MalformedChain | Refusal::ShortHeader | Refusal::WrongDirection
        )
    }
}
