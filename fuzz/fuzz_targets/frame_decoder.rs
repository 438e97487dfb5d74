//! Arbitrary bytes, pushed in arbitrary chunks, into the frame decoder: it must return
//! frames or errors, never panic, and never buffer past its limit plus one chunk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use voither_proto::{encode_frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // First byte picks the chunk size, so split points are explored too.
    let chunk = usize::from(data[0]).max(1);
    let max = 64 * 1024;
    let mut dec = FrameDecoder::new(max);
    for part in data[1..].chunks(chunk) {
        dec.push(part);
        loop {
            match dec.next_frame() {
                Ok(Some(frame)) => {
                    // Whatever decodes re-encodes and decodes to the same frame.
                    let mut out = Vec::new();
                    if encode_frame(&frame, &mut out, usize::MAX).is_ok() {
                        let mut again = FrameDecoder::new(usize::MAX);
                        again.push(&out);
                        assert_eq!(again.next_frame().ok().flatten().as_ref(), Some(&frame));
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        assert!(dec.pending() <= max + 4 + chunk, "decoder buffered past its limit");
    }
    let _ = dec.finish();
});
