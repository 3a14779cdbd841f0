#![no_main]
//! See `squire::fuzzing::config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    squire::fuzzing::config(data);
});
