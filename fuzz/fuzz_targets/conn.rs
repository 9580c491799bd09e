#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| regproxy::fuzzing::conn(data));
