#![no_main]
//! See `squire::fuzzing::consul_health`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    squire::fuzzing::consul_health(data);
});
