fn main() {
    eprintln!("cairn: not built yet");
    std::process::exit(2);
}
