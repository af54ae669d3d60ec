//! Finding a kernel source's entry points. Shared by `build.rs` (the emulated device's registry)
//! and the CUDA backend (which functions to look up in each compiled module).

/// `extern "C" __global__ void NAME(` entry points of a kernel source, in order.
pub fn entry_points(src: &str) -> Vec<String> {
    let pat = "extern \"C\" __global__ void ";
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find(pat) {
        rest = &rest[i + pat.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            names.push(name);
        }
    }
    names
}
