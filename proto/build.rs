//! Compiles `engine.proto` and `peer.proto`. Uses `$PROTOC` when set, else the vendored
//! protoc binary, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
        unsafe { std::env::set_var("PROTOC", protoc) };
    }
    println!("cargo:rerun-if-changed=engine.proto");
    println!("cargo:rerun-if-changed=peer.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure().compile_protos(&["engine.proto", "peer.proto"], &["."])?;
    Ok(())
}
