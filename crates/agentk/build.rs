// Exposes the host triple to the crate-graph test (cargo sets TARGET only for build scripts).
fn main() {
    let target = std::env::var("TARGET").unwrap_or_else(|_| "x86_64-unknown-linux-gnu".into());
    println!("cargo:rustc-env=HOST_TRIPLE={target}");
}
