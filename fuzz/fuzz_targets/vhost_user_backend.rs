//! A hostile vhost-user frontend on a running export's socket (`appliance_fuzz::vhost_user`).
#![no_main]

libfuzzer_sys::fuzz_target!(init: appliance_fuzz::init_logging(), |data: &[u8]| {
    appliance_fuzz::vhost_user::run(data)
});
