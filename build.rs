//! Compiles our own control API. containerd's snapshots API comes generated
//! from the `containerd-snapshots` crate, so only proto/ is compiled here.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_build::configure()
        .build_server(true)
        .build_client(true)
        .compile(&["proto/seamless/v1/control.proto"], &["proto"])?;
    Ok(())
}
