//! virtio-scsi control-queue requests (TMF, AN) amid I/O and LUN changes (`appliance_fuzz::scsi`).
#![no_main]

libfuzzer_sys::fuzz_target!(init: appliance_fuzz::init_logging(), |data: &[u8]| {
    appliance_fuzz::scsi::run_tmf(data)
});
