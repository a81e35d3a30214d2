//! Client-supplied strings in log lines, cut to a readable length.
//!
//! A topic, client id, username or filter comes from the client and may be as long as a packet
//! allows (64 KiB and more): logged whole, one forbidden publish costs a 64 KiB log line, and a
//! loop of them floods the log. [`Clip`] shows the first [`MAX_CHARS`] characters and says how
//! long the whole was.

use std::fmt;

/// Characters of a client-supplied string shown in a log line.
pub(crate) const MAX_CHARS: usize = 128;

/// A client-supplied string for a log line: whole if short, else its first [`MAX_CHARS`]
/// characters and `…(N bytes)`.
#[derive(Clone, Copy)]
pub(crate) struct Clip<'a>(pub(crate) &'a str);

impl fmt::Display for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.char_indices().nth(MAX_CHARS) {
            None => f.write_str(self.0),
            Some((cut, _)) => write!(f, "{}…({} bytes)", &self.0[..cut], self.0.len()),
        }
    }
}

impl fmt::Debug for Clip<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// [`Clip`] for an optional string (a username), `-` when absent.
pub(crate) fn clip_opt(s: Option<&str>) -> Clip<'_> {
    Clip(s.unwrap_or("-"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_strings_stay_whole_long_ones_are_cut_with_their_length() {
        assert_eq!(Clip("k3sense/pi-1/state").to_string(), "k3sense/pi-1/state");
        let exact = "x".repeat(MAX_CHARS);
        assert_eq!(Clip(&exact).to_string(), exact);
        let long = "a".repeat(65_536);
        let shown = Clip(&long).to_string();
        assert_eq!(shown, format!("{}…(65536 bytes)", "a".repeat(MAX_CHARS)));
        // Cut on a character boundary.
        let wide = "é".repeat(200);
        assert_eq!(
            Clip(&wide).to_string(),
            format!("{}…(400 bytes)", "é".repeat(MAX_CHARS))
        );
        assert_eq!(clip_opt(None).to_string(), "-");
    }
}
