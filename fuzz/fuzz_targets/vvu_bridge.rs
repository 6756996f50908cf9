//! The VVU bridge fed by a hostile frontend on rxq and a misbehaving device (`appliance_fuzz::vvu`).
#![no_main]

libfuzzer_sys::fuzz_target!(init: appliance_fuzz::init_logging(), |data: &[u8]| {
    appliance_fuzz::vvu::run(data)
});
