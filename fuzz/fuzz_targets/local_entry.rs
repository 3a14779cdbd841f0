#![no_main]
//! See `squire::fuzzing::local_entry`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    squire::fuzzing::local_entry(data);
});
