fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    // protox compiles the protos in pure Rust, so no `protoc` is needed on the build machine.
    let fds = protox::compile(["meridian.proto", "raft.proto"], ["proto"])?;
    tonic_build::configure().compile_fds(fds)?;
    Ok(())
}
