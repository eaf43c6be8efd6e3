//! Generates the protobuf messages and the async ttrpc client and server code from
//! `proto/` into `OUT_DIR/generated/`, plus a `mod.rs` that `src/lib.rs` includes.
//! ttrpc-codegen's own parser is used, so the build needs no `protoc`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

/// The protocol's `.proto` files, relative to `proto/`. Each one becomes a module
/// `<name>` (messages) and, if it declares a service, `<name>_ttrpc` (client and server).
const PROTOS: &[&str] = &[
    "crx/agent/v1/health.proto",
    "crx/agent/v1/agent.proto",
    "crx/agent/v1/storage.proto",
    "crx/agent/v1/metrics.proto",
    "crx/agent/v1/sandbox.proto",
    "crx/agent/v1/container.proto",
    "crx/agent/v1/stdio.proto",
    "crx/agent/v1/portforward.proto",
];

fn main() -> io::Result<()> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").map_err(io::Error::other)?);
    let gen_dir = out_dir.join("generated");
    // Fresh each time, so a module list built from what exists holds nothing stale.
    if gen_dir.exists() {
        fs::remove_dir_all(&gen_dir)?;
    }
    fs::create_dir_all(&gen_dir)?;

    let include = Path::new("proto");
    let inputs: Vec<PathBuf> = PROTOS.iter().map(|p| include.join(p)).collect();
    for input in &inputs {
        println!("cargo:rerun-if-changed={}", input.display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    Codegen::new()
        .out_dir(&gen_dir)
        .inputs(&inputs)
        .include(include)
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()?;

    // Our own mod.rs (rather than the generators'), so the module list is exactly the
    // files above and nothing the generators happen to leave in OUT_DIR.
    let mut mod_rs = String::new();
    for proto in PROTOS {
        let stem = Path::new(proto)
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| io::Error::other(format!("bad proto file name {proto}")))?;
        mod_rs.push_str(&format!("pub mod {stem};\n"));
        if gen_dir.join(format!("{stem}_ttrpc.rs")).exists() {
            mod_rs.push_str(&format!("pub mod {stem}_ttrpc;\n"));
        }
    }
    fs::write(gen_dir.join("mod.rs"), mod_rs)
}
