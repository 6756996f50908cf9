//! SCSI status and sense data (SPC-4 §4.5, fixed format).

/// SCSI status codes.
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION: sense data describes the error.
    pub const CHECK_CONDITION: u8 = 0x02;
}

/// Sense key, additional sense code and qualifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
}

/// Length of fixed-format sense data as produced here.
pub const FIXED_SENSE_LEN: usize = 18;

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }

    /// No error.
    pub const NO_SENSE: Sense = Sense::new(0x00, 0x00, 0x00);
    /// Opcode not supported.
    pub const INVALID_OPCODE: Sense = Sense::new(0x05, 0x20, 0x00);
    /// A CDB field holds an unsupported value.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(0x05, 0x24, 0x00);
    /// A parameter list field holds an unsupported value.
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Sense = Sense::new(0x05, 0x26, 0x00);
    /// The parameter list length does not fit the data.
    pub const PARAMETER_LIST_LENGTH_ERROR: Sense = Sense::new(0x05, 0x1a, 0x00);
    /// The LBA range is outside the medium.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(0x05, 0x21, 0x00);
    /// The addressed logical unit does not exist.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x25, 0x00);
    /// Saved mode pages are not supported.
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Sense = Sense::new(0x05, 0x39, 0x00);
    /// The medium is write protected.
    pub const WRITE_PROTECTED: Sense = Sense::new(0x07, 0x27, 0x00);
    /// Thin provisioning ran out of space.
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(0x07, 0x27, 0x07);
    /// A read failed.
    pub const UNRECOVERED_READ_ERROR: Sense = Sense::new(0x03, 0x11, 0x00);
    /// A write failed.
    pub const WRITE_ERROR: Sense = Sense::new(0x03, 0x0c, 0x00);
    /// Any other internal failure.
    pub const INTERNAL_TARGET_FAILURE: Sense = Sense::new(0x04, 0x44, 0x00);
    /// VERIFY with BYTCHK found different data.
    pub const MISCOMPARE_DURING_VERIFY: Sense = Sense::new(0x0e, 0x1d, 0x00);
    /// Unit attention: power on, reset or bus device reset occurred.
    pub const POWER_ON_RESET: Sense = Sense::new(0x06, 0x29, 0x00);
    /// Unit attention: logical unit reset.
    pub const LUN_RESET_OCCURRED: Sense = Sense::new(0x06, 0x29, 0x03);
    /// Unit attention: I_T nexus loss.
    pub const I_T_NEXUS_LOSS: Sense = Sense::new(0x06, 0x29, 0x07);
    /// Unit attention: the LUN inventory changed.
    pub const REPORTED_LUNS_DATA_CHANGED: Sense = Sense::new(0x06, 0x3f, 0x0e);
    /// Unit attention: the capacity changed (SPC-4, ASC 2Ah/ASCQ 09h), after online resize.
    pub const CAPACITY_DATA_HAS_CHANGED: Sense = Sense::new(0x06, 0x2a, 0x09);

    /// Fixed-format sense data with the INFORMATION field set (and VALID).
    pub fn fixed_with_information(&self, information: u32) -> [u8; FIXED_SENSE_LEN] {
        let mut s = self.fixed();
        s[0] |= 0x80;
        s[3..7].copy_from_slice(&information.to_be_bytes());
        s
    }

    /// Fixed-format sense data (response code 0x70, current error).
    pub fn fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut s = [0u8; FIXED_SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        s[7] = (FIXED_SENSE_LEN - 8) as u8;
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::Sense;

    #[test]
    fn fixed_format_layout() {
        let s = Sense::LBA_OUT_OF_RANGE.fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], 0x05);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x21, 0x00));
    }
}
