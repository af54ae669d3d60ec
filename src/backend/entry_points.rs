//! Finding a kernel source's entry points. Shared by `build.rs` (the emulated device's registry)
//! and the CUDA backend (which functions to look up in each compiled module).

/// `extern "C" __global__ void NAME(` entry points of a kernel source, in order (also with
/// `__launch_bounds__(...)` before the name).
pub fn entry_points(src: &str) -> Vec<String> {
    let pat = "extern \"C\" __global__ void ";
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find(pat) {
        rest = &rest[i + pat.len()..];
        // `void __launch_bounds__(N) name(`: skip the qualifier (its argument must not contain
        // parentheses).
        if let Some(after) = rest.strip_prefix("__launch_bounds__(") {
            let close = after.find(')').map_or(after.len(), |j| j + 1);
            rest = after[close..].trim_start();
        }
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

#[cfg(test)]
mod tests {
    use super::entry_points;

    #[test]
    fn finds_plain_entries_and_entries_with_launch_bounds() {
        let src = "extern \"C\" __global__ void a_f16(int x) {}\n\
                   extern \"C\" __global__ void __launch_bounds__(BIG_THREADS)\n\
                   b_bf16(const bf16* x) {}\n\
                   __device__ void helper() {}\n";
        assert_eq!(entry_points(src), ["a_f16", "b_bf16"]);
    }
}
