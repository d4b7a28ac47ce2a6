//! embassy-stm32's `memory-x` feature generates the memory map (RAM in AXI SRAM at
//! 0x2400_0000, which the Ethernet DMA can reach), so this only asks for a relink when
//! the script changes; the linker scripts are passed in .cargo/config.toml.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
