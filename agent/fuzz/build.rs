//! Declares the agent's modules for `src/lib.rs`: every `mod name;` of
//! agent/src/main.rs (with the attributes above it), pointed at the agent's own files,
//! so a module the agent adds reaches the fuzz build without an edit here.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let manifest = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let agent_src = manifest
        .join("../src")
        .canonicalize()
        .expect("agent/src next to agent/fuzz");
    let main_rs = agent_src.join("main.rs");
    println!("cargo:rerun-if-changed={}", main_rs.display());
    let text = std::fs::read_to_string(&main_rs).expect("read agent/src/main.rs");

    let mut out = String::new();
    let mut attributes = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("#[") {
            attributes.push(line);
            continue;
        }
        let name = line
            .strip_prefix("pub mod ")
            .or_else(|| line.strip_prefix("mod "))
            .and_then(|rest| rest.strip_suffix(';'));
        match name {
            // Declared by src/lib.rs itself, public.
            Some("fuzzing") => {}
            Some(name) => {
                for attribute in &attributes {
                    out.push_str(attribute);
                    out.push('\n');
                }
                let path = module_file(&agent_src, name);
                println!("cargo:rerun-if-changed={}", path.display());
                writeln!(
                    out,
                    "#[path = {:?}]\nmod {name};",
                    path.display().to_string()
                )
                .expect("write to a String");
            }
            None => {}
        }
        if !line.starts_with("///") {
            attributes.clear();
        }
    }
    let generated = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"))
        .join("agent_modules.rs");
    std::fs::write(generated, out).expect("write agent_modules.rs");
}

/// `name.rs` or `name/mod.rs`, as rustc looks for it.
fn module_file(src: &Path, name: &str) -> PathBuf {
    let flat = src.join(format!("{name}.rs"));
    if flat.exists() {
        flat
    } else {
        src.join(name).join("mod.rs")
    }
}
