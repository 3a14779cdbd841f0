#![no_main]
//! See `squire::fuzzing::instance`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    squire::fuzzing::instance(data);
});
