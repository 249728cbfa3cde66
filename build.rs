//! Compiles proto/fsd.proto with a protoc shipped by the `protoc-bin-vendored` crate, so a fresh
//! machine needs nothing from the system package manager.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    prost_build::Config::new()
        .compile_protos(&["proto/fsd.proto", "proto/state.proto"], &["proto/"])?;
    Ok(())
}
