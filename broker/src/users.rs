//! The users file: who may connect.
//!
//! One `username:password` per line; blank lines and `#` comments are ignored. In a cluster the
//! file comes from a Secret. Passwords never appear in logs or `Debug` output.

use std::{collections::HashMap, fmt, path::Path};

use crate::{Error, Result};

/// The accounts the broker accepts.
#[derive(Clone, Default)]
pub struct Users {
    passwords: HashMap<String, String>,
}

impl Users {
    /// Reads and parses a users file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::UsersFile {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, reason)| Error::UsersSyntax {
            path: path.to_owned(),
            line,
            reason,
        })
    }

    /// Parses the file's text; on error, the 1-based line number and the reason.
    pub fn parse(text: &str) -> Result<Self, (usize, &'static str)> {
        let mut passwords = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (user, password) = line
                .split_once(':')
                .ok_or((line_no, "no `:` between username and password"))?;
            let user = user.trim();
            if user.is_empty() {
                return Err((line_no, "empty username"));
            }
            if password.is_empty() {
                return Err((line_no, "empty password"));
            }
            if passwords
                .insert(user.to_owned(), password.to_owned())
                .is_some()
            {
                return Err((line_no, "username listed twice"));
            }
        }
        if passwords.is_empty() {
            return Err((0, "no accounts in the file"));
        }
        Ok(Self { passwords })
    }

    /// Number of accounts.
    pub fn len(&self) -> usize {
        self.passwords.len()
    }

    /// Whether there are no accounts.
    pub fn is_empty(&self) -> bool {
        self.passwords.is_empty()
    }

    /// One account, for the start-up probe that proves the listener answers MQTT.
    pub(crate) fn any_login(&self) -> Option<(String, String)> {
        self.passwords
            .iter()
            .min_by_key(|(user, _)| user.as_str())
            .map(|(u, p)| (u.clone(), p.clone()))
    }

    /// The username → password table rumqttd takes.
    pub(crate) fn into_table(self) -> HashMap<String, String> {
        self.passwords
    }
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self.passwords.keys().collect();
        names.sort();
        f.debug_struct("Users").field("names", &names).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_accounts_comments_and_blank_lines() {
        let users =
            Users::parse("# k3sense\npublisher:s3cret:with:colons\n\n gateway : pw\r\n").unwrap();
        assert_eq!(users.len(), 2);
        let table = users.into_table();
        assert_eq!(table["publisher"], "s3cret:with:colons");
        assert_eq!(table["gateway"], " pw");
    }

    #[test]
    fn rejects_bad_lines_with_their_number() {
        assert_eq!(Users::parse("a:b\nnocolon").unwrap_err().0, 2);
        assert_eq!(Users::parse(":pw").unwrap_err(), (1, "empty username"));
        assert_eq!(Users::parse("a:").unwrap_err(), (1, "empty password"));
        assert_eq!(
            Users::parse("a:1\na:2").unwrap_err(),
            (2, "username listed twice")
        );
        assert!(Users::parse("# only comments\n").is_err());
    }

    #[test]
    fn debug_never_shows_passwords() {
        let users = Users::parse("alice:hunter2").unwrap();
        let shown = format!("{users:?}");
        assert!(
            shown.contains("alice") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
