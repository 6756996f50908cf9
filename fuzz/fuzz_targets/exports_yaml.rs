//! `exports.yaml` text: parse, validate, machine checks, reload diff (`appliance_fuzz::yaml`).
#![no_main]

libfuzzer_sys::fuzz_target!(init: appliance_fuzz::init_logging(), |data: &[u8]| {
    appliance_fuzz::yaml::run(data)
});
