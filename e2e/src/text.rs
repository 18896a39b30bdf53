//! Reading request targets as a lenient server would, for the tests that check nothing reaches the
//! node's secrets in any spelling.

/// `%XX` sequences decoded (once; invalid ones kept as they are), lossily as UTF-8.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn decodes_valid_escapes_and_keeps_the_rest() {
        assert_eq!(super::percent_decode("/a%2Fb%41%zz%4"), "/a/bA%zz%4");
    }
}
