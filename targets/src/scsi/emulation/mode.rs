//! MODE SENSE(6/10) and MODE SELECT(6/10) (SPC-4 6.9-6.12) of the emulated logical unit,
//! and the mode pages it reports: Caching (08h, SBC-3 6.4.5; WCE follows the write cache
//! setting) and Control (0Ah, SPC-4 7.5.8).

use super::*;

impl Lun {
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

    pub(super) fn mode_sense(&self, cdb: &[u8]) -> Outcome {
        let ten = cdb[0] == MODE_SENSE_10;
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
            let blocks = u32::try_from(self.blocks()).unwrap_or(u32::MAX);
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
    pub(super) fn mode_select(&self, cdb: &[u8], params: &[u8]) -> Outcome {
        let ten = cdb[0] == MODE_SELECT_10;
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
}
