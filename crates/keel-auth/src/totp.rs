//! Time-based one-time passwords (RFC 6238, HOTP of RFC 4226 over 30-second steps,
//! HMAC-SHA1, six digits): what authenticator apps show.

use ring::hmac;

/// Seconds per step, digits per code.
const STEP: i64 = 30;
const DIGITS: u32 = 6;

/// RFC 4226 §5.3: the code for `counter`.
fn hotp(secret: &[u8], counter: u64) -> u32 {
    let key = hmac::Key::new(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let mac = hmac::sign(&key, &counter.to_be_bytes());
    let mac = mac.as_ref();
    let offset = usize::from(mac[mac.len() - 1] & 0x0f);
    let binary = u32::from_be_bytes([
        mac[offset] & 0x7f,
        mac[offset + 1],
        mac[offset + 2],
        mac[offset + 3],
    ]);
    binary % 10u32.pow(DIGITS)
}

/// The code shown at `now`, as six digits (what an authenticator app computes; tests and
/// tools use it).
pub fn code_at(secret: &[u8], now: i64) -> String {
    format!(
        "{:06}",
        hotp(secret, u64::try_from(now.div_euclid(STEP)).unwrap_or(0))
    )
}

/// The time step `code` belongs to, when it is the code of the current step or of one
/// step either side (clock drift between phone and server; RFC 6238 §6).
pub fn matching_step(secret: &[u8], code: &str, now: i64) -> Option<i64> {
    if code.len() != 6 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let current = now.div_euclid(STEP);
    (current - 1..=current + 1).find(|step| {
        u64::try_from(*step).is_ok_and(|counter| format!("{:06}", hotp(secret, counter)) == code)
    })
}

/// The `otpauth://` URI an authenticator app takes `secret` from, labelled with the
/// user's name.
pub fn otpauth_uri(username: &str, secret: &[u8]) -> String {
    let label: String =
        url::form_urlencoded::byte_serialize(format!("Keel:{username}").as_bytes()).collect();
    format!(
        "otpauth://totp/{label}?secret={}&issuer=Keel&algorithm=SHA1&digits=6&period=30",
        base32(secret)
    )
}

/// RFC 4648 base32 without padding, as otpauth URIs carry secrets.
pub fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for byte in bytes {
        buffer = (buffer << 8) | u32::from(*byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(char::from(ALPHABET[((buffer >> bits) & 31) as usize]));
        }
    }
    if bits > 0 {
        out.push(char::from(ALPHABET[((buffer << (5 - bits)) & 31) as usize]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // RFC 6238 appendix B, SHA-1 (the 8-digit values' last six digits).
    const SECRET: &[u8] = b"12345678901234567890";

    #[test]
    fn codes_match_rfc_6238() {
        for (time, code) in [
            (59, "287082"),
            (1_111_111_109, "081804"),
            (1_234_567_890, "005924"),
            (2_000_000_000, "279037"),
        ] {
            assert_eq!(code_at(SECRET, time), code, "{time}");
        }
    }

    #[test]
    fn a_code_matches_its_step_and_its_neighbours_only() {
        let now = 1_111_111_109;
        let code = code_at(SECRET, now);
        assert_eq!(matching_step(SECRET, &code, now), Some(now / 30));
        assert_eq!(
            matching_step(SECRET, &code, now + 30),
            Some(now / 30),
            "one step late"
        );
        assert_eq!(
            matching_step(SECRET, &code, now + 90),
            None,
            "three steps late"
        );
        for bad in ["", "12345", "1234567", "abcdef", "12 456"] {
            assert_eq!(matching_step(SECRET, bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn base32_follows_rfc_4648() {
        assert_eq!(base32(b""), "");
        assert_eq!(base32(b"f"), "MY");
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(SECRET), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
    }
}
