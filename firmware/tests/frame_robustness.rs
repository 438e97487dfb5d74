//! Device frame decoder on hostile input: truncations, mutations and noise give an error
//! or a valid frame, never a panic.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use voither_firmware::frame::{Error, Frame, Quantity, Reading, Unit, MAX_ENCODED_LEN, MAX_READINGS};

fn sample(rng: &mut StdRng) -> Vec<u8> {
    let mut frame = Frame::new(rng.random(), rng.random(), rng.random());
    for _ in 0..rng.random_range(0..=MAX_READINGS) {
        frame.push(Reading::new(Quantity(rng.random()), Unit(rng.random()), rng.random(), rng.random())).unwrap();
    }
    let mut buf = [0u8; MAX_ENCODED_LEN];
    let len = frame.encode(&mut buf).unwrap();
    buf[..len].to_vec()
}

/// Decodes; a frame that decodes must also survive its own re-encoding unchanged (the
/// decoder accepts non-shortest integer forms, so the bytes themselves may differ).
fn check(bytes: &[u8]) -> Result<Frame, Error> {
    let result = Frame::decode(bytes);
    if let Ok(frame) = &result {
        let mut buf = [0u8; MAX_ENCODED_LEN];
        let len = frame.encode(&mut buf).unwrap();
        assert_eq!(Frame::decode(&buf[..len]).as_ref(), Ok(frame));
    }
    result
}

#[test]
fn every_truncation_is_an_error() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..500 {
        let bytes = sample(&mut rng);
        for cut in 0..bytes.len() {
            assert_eq!(check(&bytes[..cut]), Err(Error::Malformed), "cut at {cut} of {}", bytes.len());
        }
    }
}

#[test]
fn random_mutations_never_panic() {
    let mut rng = StdRng::seed_from_u64(0xBAD_F00D);
    let (mut ok, mut err) = (0u32, 0u32);
    for _ in 0..100_000 {
        let mut bytes = sample(&mut rng);
        for _ in 0..rng.random_range(1..=4) {
            let len = bytes.len();
            match rng.random_range(0..6) {
                0 => {
                    let i = rng.random_range(0..len);
                    bytes[i] ^= 1 << rng.random_range(0..8);
                }
                1 => {
                    let i = rng.random_range(0..len);
                    bytes[i] = rng.random();
                }
                2 if len > 1 => {
                    bytes.remove(rng.random_range(0..len));
                }
                3 => bytes.insert(rng.random_range(0..=len), rng.random()),
                4 => bytes.truncate(rng.random_range(0..=len)),
                _ => {
                    // A plausible CBOR head in a random place: lengths and wide integers.
                    let head = [0x1B, 0x9B, 0x9F, 0xBF, 0xFF, 0x5B, 0x7B, 0xFB, 0xC0, 0xF9][rng.random_range(0..10)];
                    bytes.insert(rng.random_range(0..=len), head);
                }
            }
            if bytes.is_empty() {
                break;
            }
        }
        match check(&bytes) {
            Ok(_) => ok += 1,
            Err(_) => err += 1,
        }
    }
    // Both outcomes occur: single bit flips in values decode to other valid frames.
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}

#[test]
fn random_noise_never_panics() {
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..100_000 {
        let len = rng.random_range(0..64);
        let mut bytes = vec![0u8; len];
        rng.fill(&mut bytes[..]);
        let _ = check(&bytes);
    }
}

#[test]
fn noise_after_a_valid_header_never_panics() {
    let mut rng = StdRng::seed_from_u64(6);
    for _ in 0..100_000 {
        let mut bytes = vec![0x85, 0x01];
        let tail = rng.random_range(0..48);
        bytes.extend((0..tail).map(|_| rng.random::<u8>()));
        let _ = check(&bytes);
    }
}
