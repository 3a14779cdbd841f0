#![no_main]
//! See `squire::fuzzing::eureka_applications`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    squire::fuzzing::eureka_applications(data);
});
