//! agentk, the in-cluster agent. The foundation only reserves its place in the crate graph.

fn main() {
    println!("agentk {}: not yet implemented", env!("CARGO_PKG_VERSION"));
}
