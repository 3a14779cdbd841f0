#![no_main]
//! See `squire::fuzzing::last_known`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    squire::fuzzing::last_known(data);
});
