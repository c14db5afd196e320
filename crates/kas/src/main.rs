//! kas, the agent server. The foundation only reserves its place in the crate graph; the
//! listeners, store and modules arrive with the tunnel issue.

fn main() {
    println!("kas {}: not yet implemented", env!("CARGO_PKG_VERSION"));
}
