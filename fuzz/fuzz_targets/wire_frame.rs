#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| edgesync_fuzz::wire_frame(data));
