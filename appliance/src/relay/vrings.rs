//! What the relay follows of each vring's state in the daemon, to carry one message order
//! that vhost-user-backend 0.24 mishandles: SET_VRING_KICK on a vring that is started and
//! enabled (the vhost-user spec allows it; QEMU sends it only after GET_VRING_BASE). The
//! crate's `set_vring_kick` swaps the kick file without moving the ring's epoll
//! registration, which changes only when a ring starts, is enabled or disabled, or stops
//! (`update_vring_registration`). So the new fd was never polled and the frontend's kicks
//! went unseen; and where the new fd is the same file as the old (the appliance VM's bridge
//! hands over the one MSI-X eventfd of the vring every time) each kick woke the stale
//! registration, whose read of the new fd found nothing, and the worker thread stopped.
//!
//! The relay wraps such a message in SET_VRING_ENABLE 0 and 1 of that vring (spec, "Ring
//! states"): disabling drops the old registration while the old fd is still the ring's,
//! enabling registers the new one, and nothing else about the ring changes. It does so only
//! with VHOST_USER_F_PROTOCOL_FEATURES acked, without which SET_VRING_ENABLE is refused;
//! QEMU, libblkio and the kernel's vhost-user frontends all ack it.

use vhost::vhost_user::message::{FrontendReq, VhostUserVirtioFeatures};

use super::{HEADER_SIZE, VERSION};

/// The vring index field of SET_VRING_KICK/CALL/ERR's u64 payload.
const VRING_INDEX_MASK: u64 = 0xff;

/// The daemon's view of each vring, as the messages that reach it change it (the crate's
/// `VhostUserHandler`): vrings 0-63, the most the crate serves.
#[derive(Debug, Default)]
pub(super) struct Vrings {
    /// VHOST_USER_F_PROTOCOL_FEATURES is in the features the daemon has acked.
    protocol_features: bool,
    /// Bit i: vring i is started (it got a kick fd; until GET_VRING_BASE stops it).
    started: u64,
    /// Bit i: vring i is enabled (SET_VRING_ENABLE 1; RESET_DEVICE disables all).
    enabled: u64,
}

fn le64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

/// Bit of vring `index` in a mask, if the crate can serve that vring.
fn bit(index: u64) -> Option<u64> {
    (index < 64).then(|| 1 << index)
}

impl Vrings {
    /// Follows one frontend message on its way to the daemon. Returns the vring whose kick
    /// fd it replaces while the ring is started and enabled: the relay then sends the daemon
    /// [`set_vring_enable`] 0 before the message and 1 after it.
    pub(super) fn on_frontend_message(&mut self, request: u32, payload: &[u8]) -> Option<u32> {
        let vring_state_index = || le64(payload).map(|v| v & 0xffff_ffff);
        match request {
            r if r == FrontendReq::SET_FEATURES as u32 => {
                let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
                self.protocol_features = le64(payload).is_some_and(|f| f & protocol != 0);
                if !self.protocol_features {
                    // Without PROTOCOL_FEATURES the crate enables every ring right away.
                    self.enabled = u64::MAX;
                }
            }
            r if r == FrontendReq::RESET_OWNER as u32 => self.protocol_features = false,
            r if r == FrontendReq::RESET_DEVICE as u32 => {
                self.protocol_features = false;
                self.enabled = 0;
            }
            r if r == FrontendReq::SET_VRING_ENABLE as u32 => {
                // VhostUserVringState: u32 index, u32 num (1 enables).
                let (Some(state), Some(bit)) = (le64(payload), vring_state_index().and_then(bit))
                else {
                    return None;
                };
                if state >> 32 != 0 {
                    self.enabled |= bit;
                } else {
                    self.enabled &= !bit;
                }
            }
            r if r == FrontendReq::GET_VRING_BASE as u32 => {
                if let Some(bit) = vring_state_index().and_then(bit) {
                    self.started &= !bit;
                }
            }
            r if r == FrontendReq::SET_VRING_KICK as u32 => {
                let index = le64(payload)? & VRING_INDEX_MASK;
                let bit = bit(index)?;
                let replaced =
                    self.protocol_features && self.started & bit != 0 && self.enabled & bit != 0;
                // A kick fd starts the ring; one without (NOFD) leaves it as it was.
                if le64(payload)? & (1 << 8) == 0 {
                    self.started |= bit;
                }
                return replaced.then_some(index as u32);
            }
            _ => {}
        }
        None
    }
}

/// SET_VRING_ENABLE of `vring` for the relay to send the daemon itself: without NEED_REPLY,
/// so the daemon sends no answer that the frontend would not expect.
pub(super) fn set_vring_enable(vring: u32, enable: bool) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER_SIZE + 8);
    bytes.extend_from_slice(&(FrontendReq::SET_VRING_ENABLE as u32).to_le_bytes());
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&8u32.to_le_bytes());
    bytes.extend_from_slice(&vring.to_le_bytes());
    bytes.extend_from_slice(&u32::from(enable).to_le_bytes());
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kick(vring: u64) -> Vec<u8> {
        vring.to_le_bytes().to_vec()
    }

    fn state(vring: u32, num: u32) -> Vec<u8> {
        [vring.to_le_bytes(), num.to_le_bytes()].concat()
    }

    fn send(v: &mut Vrings, request: FrontendReq, payload: &[u8]) -> Option<u32> {
        v.on_frontend_message(request as u32, payload)
    }

    fn running(vring: u32) -> Vrings {
        let mut v = Vrings::default();
        let features = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | 1;
        send(&mut v, FrontendReq::SET_FEATURES, &features.to_le_bytes());
        assert_eq!(
            send(&mut v, FrontendReq::SET_VRING_KICK, &kick(vring.into())),
            None
        );
        send(&mut v, FrontendReq::SET_VRING_ENABLE, &state(vring, 1));
        v
    }

    #[test]
    fn a_kick_replaced_on_a_running_ring_is_named() {
        let mut v = running(2);
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &kick(2)), Some(2));
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &kick(2)), Some(2));
        // NOFD on a running ring moves the registration too.
        assert_eq!(
            send(&mut v, FrontendReq::SET_VRING_KICK, &kick(2 | 1 << 8)),
            Some(2)
        );
        // Other rings are not running.
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &kick(1)), None);
    }

    #[test]
    fn only_started_enabled_rings_with_protocol_features_are_named() {
        // Stopped by GET_VRING_BASE: the next kick starts it (the crate registers it).
        let mut v = running(0);
        send(&mut v, FrontendReq::GET_VRING_BASE, &state(0, 0));
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &kick(0)), None);
        // Disabled.
        let mut v = running(0);
        send(&mut v, FrontendReq::SET_VRING_ENABLE, &state(0, 0));
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &kick(0)), None);
        // RESET_DEVICE disables every ring and forgets the acked features.
        let mut v = running(0);
        send(&mut v, FrontendReq::RESET_DEVICE, &[]);
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &kick(0)), None);
        // Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE to send.
        let mut v = running(0);
        send(&mut v, FrontendReq::SET_FEATURES, &1u64.to_le_bytes());
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &kick(0)), None);
        // ... and the crate enabled every ring then, which they stay once it is acked.
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        send(&mut v, FrontendReq::SET_FEATURES, &protocol.to_le_bytes());
        send(&mut v, FrontendReq::SET_VRING_KICK, &kick(5));
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &kick(5)), Some(5));
        // Vrings past the crate's 64 and short payloads pass untouched.
        let mut v = running(0);
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &kick(64)), None);
        assert_eq!(send(&mut v, FrontendReq::SET_VRING_KICK, &[0; 4]), None);
    }

    #[test]
    fn the_enable_message_is_a_vring_state_without_need_reply() {
        let m = set_vring_enable(3, true);
        assert_eq!(m.len(), HEADER_SIZE + 8);
        assert_eq!(
            m[0..4],
            (FrontendReq::SET_VRING_ENABLE as u32).to_le_bytes()
        );
        assert_eq!(m[4..8], VERSION.to_le_bytes());
        assert_eq!(m[8..12], 8u32.to_le_bytes());
        assert_eq!(m[12..20], state(3, 1)[..]);
        assert_eq!(set_vring_enable(3, false)[12..20], state(3, 0)[..]);
    }
}
