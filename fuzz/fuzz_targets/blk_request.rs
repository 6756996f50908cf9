//! virtio-blk requests over a hostile split ring, onto real disks (`appliance_fuzz::blk`).
#![no_main]

libfuzzer_sys::fuzz_target!(init: appliance_fuzz::init_logging(), |data: &[u8]| {
    appliance_fuzz::blk::run(data)
});
