fn main() {
    std::process::exit(afa::cli::main());
}
