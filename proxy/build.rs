//! Embeds the eBPF steering object built by `cargo xtask build-ebpf`.
//!
//! The object is taken from `PROXY_EBPF_OBJECT` (set by xtask) or from the
//! workspace's default eBPF target folder. Without it the proxy still builds
//! (so that `cargo build`, clippy and unit tests need no nightly) and runs
//! with plain SO_REUSEPORT, saying so loudly.

use std::{env, fs, path::PathBuf};

fn main() {
    // Relative relocations packed as DT_RELR (glibc 2.36, binutils 2.38):
    // 3 KiB instead of 300 KiB that the dynamic loader reads at every start
    // and that stays resident (RSS at start -0.2 MB). An older linker warns
    // and ignores it.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    println!("cargo:rerun-if-env-changed=PROXY_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = env::var_os("PROXY_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/bpfel-unknown-none/release/proxy"));
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("proxy-ebpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=eBPF object {} not found: this build has no eBPF steering (run `cargo xtask build`)",
                object.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
