//! Compiles the contract with protox, so no system `protoc` is needed, and
//! keeps the file descriptor set for gRPC server reflection.
use std::{env, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/bucket/v1/bucket.proto";
    println!("cargo:rerun-if-changed={proto}");

    let fds = protox::compile([proto], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    std::fs::write(
        out.join("bucket_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;

    // For reflection only: what google/rpc/error_details.proto imports.
    let wkt = protox::compile(
        [
            "google/protobuf/any.proto",
            "google/protobuf/duration.proto",
        ],
        ["proto"],
    )?;
    std::fs::write(
        out.join("well_known_descriptor.bin"),
        prost::Message::encode_to_vec(&wkt),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Read and written as the JSON object it stands for (see
        // src/proto/json_struct.rs), not as prost's tree of its own.
        .extern_path(".google.protobuf.Struct", "crate::proto::JsonStruct")
        .compile_fds(fds)?;
    Ok(())
}
