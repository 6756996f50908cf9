//! Mutated qcow2 images opened and read (`appliance_fuzz::qcow2`).
#![no_main]

libfuzzer_sys::fuzz_target!(init: appliance_fuzz::init_logging(), |data: &[u8]| {
    appliance_fuzz::qcow2::run(data)
});
