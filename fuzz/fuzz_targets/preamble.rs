#![no_main]
//! See `squire::fuzzing::preamble`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    squire::fuzzing::preamble(data);
});
