#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| infra_fuzz::registry_documents(data));
