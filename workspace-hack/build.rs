//! Empty on purpose: a package's build-dependencies are resolved only when it has a build script, and
//! they are what pins the features of the build scripts' own dependencies (see Cargo.toml).
fn main() {}
