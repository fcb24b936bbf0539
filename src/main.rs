mod alloc;

fn main() {
    alloc::keep_freed_memory();
    std::process::exit(afa::cli::main());
}
