//! Untrusted bytes into the stream reassembler in chunks of fuzzer-chosen sizes: nothing
//! panics, and the frames (or the error) that come out do not depend on how the stream was cut.
#![no_main]

use cairn_protocol::*;
use libfuzzer_sys::fuzz_target;

/// Frames and the error that ended the stream, feeding `stream` in chunks cut by `cuts`.
fn reassemble(stream: &[u8], cuts: &[u8]) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut r = FrameReassembler::<256>::new();
    let mut frames = Vec::new();
    let mut rest = stream;
    let mut cuts = cuts.iter().cycle();
    while !rest.is_empty() {
        let want = usize::from(*cuts.next().unwrap_or(&255)).max(1).min(rest.len());
        let n = r.feed(&rest[..want]);
        rest = &rest[n..];
        loop {
            match r.next_frame() {
                Ok(Some(f)) => frames.push(f.to_vec()),
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, r.finish().err())
}

fuzz_target!(|data: &[u8]| {
    let (cuts, stream) = data.split_at(data.len().min(8));
    let whole = reassemble(stream, &[255]);
    assert_eq!(reassemble(stream, cuts), whole);
    for f in &whole.0 {
        assert_eq!(read_frame_len(f[..HEADER_LEN].try_into().unwrap()), Ok(f.len()));
    }
});
