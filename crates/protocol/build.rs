// Compiles the protobuf files with protox (pure Rust), so building needs no `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tunnel.proto",
        "proto/agent_configuration.proto",
        "proto/gitops.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    // No `connect` constructor: it would clash with the Connect RPC, and we dial ourselves.
    tonic_prost_build::configure()
        .build_transport(false)
        // Tunnel bytes as `Bytes`: frames then move through the pipe without another copy.
        .bytes(".tether.tunnel.v1.Data")
        // Small per-RPC buffers: kas holds two idle RPCs per connected agent (src/codec.rs).
        .codec_path("crate::codec::LeanCodec")
        .compile_fds(fds)?;
    Ok(())
}
