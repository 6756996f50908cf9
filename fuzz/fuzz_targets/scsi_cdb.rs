//! SCSI commands, straight into the emulation and as virtio-scsi requests (`appliance_fuzz::scsi`).
#![no_main]

libfuzzer_sys::fuzz_target!(init: appliance_fuzz::init_logging(), |data: &[u8]| {
    appliance_fuzz::scsi::run_cdb(data)
});
