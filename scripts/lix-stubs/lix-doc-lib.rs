//! Stand-in for Lix's lix-doc without the rnix/rowan crates (meson would download them),
//! for scripts/build-lix-tarball.sh: `nix repl`'s `:doc` finds no doc-comments.

use std::ffi::c_char;

/// No documentation is ever found.
#[no_mangle]
pub extern "C" fn lixdoc_get_function_docs(
    _filename: *const c_char,
    _line: usize,
    _col: usize,
) -> *const c_char {
    std::ptr::null()
}

/// Nothing to free: `lixdoc_get_function_docs` never allocates.
#[no_mangle]
pub extern "C" fn lixdoc_free_string(_s: *const c_char) {}
