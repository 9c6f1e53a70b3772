//! `infra-operator` (installed also as `infra.operator`): a thin binary over the library crates.

fn main() {
    println!("infra.operator {}", env!("CARGO_PKG_VERSION"));
}
