//! Build script. With the `containers` feature on a musl target it links the small C
//! shim (`src/containers/fortify_shim.c`) that lets Debian's glibc-built `libseccomp.a`
//! link against musl, and checks that libseccomp will be linked statically
//! (LIBSECCOMP_LINK_TYPE and LIBSECCOMP_LIB_PATH are set for the workspace in
//! `.cargo/config.toml`). Without the feature it does nothing. See `CONTAINERS.md`.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "containers")]
    containers();
}

#[cfg(feature = "containers")]
fn containers() {
    println!("cargo:rerun-if-changed=src/containers/fortify_shim.c");
    println!("cargo:rerun-if-env-changed=LIBSECCOMP_LINK_TYPE");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.contains("musl") {
        return;
    }
    if std::env::var("LIBSECCOMP_LINK_TYPE").as_deref() != Ok("static") {
        panic!(
            "the `containers` feature on {target} needs libseccomp linked statically: set \
             LIBSECCOMP_LINK_TYPE=static and LIBSECCOMP_LIB_PATH=<a directory holding only \
             libseccomp.a> (see agent/CONTAINERS.md)"
        );
    }
    // Objects, not an archive: the linker must keep the shim whatever the link order.
    for object in cc::Build::new()
        .file("src/containers/fortify_shim.c")
        .compile_intermediates()
    {
        println!("cargo:rustc-link-arg={}", object.display());
    }
}
