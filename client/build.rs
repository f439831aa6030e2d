//! Compiles the bucket's contract (../proto) into a client only, with
//! protox: no system `protoc`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "../proto/bucket/v1/bucket.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
