//! Command line: `afa generate`, `afa bench`, ...
pub fn main() -> i32 {
    0
}
