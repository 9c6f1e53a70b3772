#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| infra_fuzz::unpack_layer(data));
