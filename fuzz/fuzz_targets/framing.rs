//! Message framing. The relay's framer must see the same messages however
//! the stream is cut into reads (a split header once desynchronised a
//! pooler); `split_typed` and ErrorResponse parsing never panic.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

use rlsproxy::relay::frame_reads;
use rlsproxy::wire::{self, ErrorFields};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the cut points, the rest is the stream.
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(seed % 16) + 1;
    let cuts: Vec<usize> = (0..stream.len()).step_by(step).collect();
    let whole = frame_reads(stream, &[]);
    let split = frame_reads(stream, &cuts);
    assert_eq!(whole.tags, split.tags);
    assert_eq!(whole.valid, split.valid);
    if whole.valid {
        assert_eq!(whole, split);
        assert!(
            stream.len() - whole.forwarded < 5,
            "only a partial header is held back"
        );
    }

    let mut buf = BytesMut::from(stream);
    while let Ok(Some((tag, body))) = wire::split_typed(&mut buf, 1 << 16) {
        if tag == b'E' || tag == b'N' {
            let _ = ErrorFields::parse(&body);
        }
    }
});
