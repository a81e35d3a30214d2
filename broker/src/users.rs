//! The users file: who may connect, and in which role.
//!
//! ```text
//! # comment
//! username:password                      # no role: full access, as before roles existed (warned at start)
//! username:password:admin                # everything
//! username:password:reader               # subscribe to <prefix>/# and homeassistant/#; never publish
//! username:password:gateway              # reader + publish replay requests (<prefix>/<id>/replay/request)
//! username:password:publisher:pi-1,pi-2  # publish the topics of these sensors only
//! username:password:publisher:*          # publish the topics of any sensor (one account for many Pis)
//! ```
//!
//! The password runs from the first `:` to the role, so it may contain `:` itself; a line whose
//! last field is not a role (or, for publishers, whose second-to-last is not `publisher`) is read
//! the old way, the whole rest being the password. In a cluster the file comes from a Secret.
//! Passwords never appear in logs or `Debug` output.

use std::{collections::HashMap, fmt, path::Path};

use k3sense_protocol::SensorId;

use crate::{Error, Result};

/// What an account may do; the rules themselves are in `acl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A line without a role: full access, like `Admin`, but warned about once at start.
    Unscoped,
    /// Everything (still no `$SYS`, and still no empty publish that would erase a reading).
    Admin,
    /// Subscribe to the readings and Home Assistant topics; every publish refused.
    Reader,
    /// A reader that may also ask publishers to replay readings (`<prefix>/<id>/replay/request`).
    Gateway,
    /// Publishes the readings of the sensors it names.
    Publisher(Sensors),
}

/// The sensors a publisher account may publish for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sensors {
    /// `*`: any valid sensor id.
    Any,
    /// A comma-separated list of sensor ids.
    Only(Vec<SensorId>),
}

impl Sensors {
    /// Whether `id` is one of these sensors.
    pub fn includes(&self, id: &str) -> bool {
        match self {
            Self::Any => SensorId::new(id).is_ok(),
            Self::Only(ids) => ids.iter().any(|s| s.as_str() == id),
        }
    }
}

impl Role {
    /// The name used in the users file and in log lines.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Unscoped => "unscoped",
            Self::Admin => "admin",
            Self::Reader => "reader",
            Self::Gateway => "gateway",
            Self::Publisher(_) => "publisher",
        }
    }
}

#[derive(Clone)]
struct Account {
    password: String,
    role: Role,
}

/// The accounts the broker accepts.
#[derive(Clone, Default)]
pub struct Users {
    accounts: HashMap<String, Account>,
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
        let mut accounts = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let line_no = index + 1;
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (user, rest) = line
                .split_once(':')
                .ok_or((line_no, "no `:` between username and password"))?;
            let user = user.trim();
            if user.is_empty() {
                return Err((line_no, "empty username"));
            }
            let (password, role) = split_role(rest).map_err(|reason| (line_no, reason))?;
            if password.is_empty() {
                return Err((line_no, "empty password"));
            }
            let account = Account {
                password: password.to_owned(),
                role,
            };
            if accounts.insert(user.to_owned(), account).is_some() {
                return Err((line_no, "username listed twice"));
            }
        }
        if accounts.is_empty() {
            return Err((0, "no accounts in the file"));
        }
        Ok(Self { accounts })
    }

    /// Number of accounts.
    pub fn len(&self) -> usize {
        self.accounts.len()
    }

    /// Whether there are no accounts.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// The role of `username` if `password` is its password. Compares in constant time, so the
    /// answer's timing tells nothing about how much of a guess was right.
    pub fn authenticate(&self, username: &str, password: &str) -> Option<&Role> {
        let account = self.accounts.get(username)?;
        constant_time_eq(account.password.as_bytes(), password.as_bytes()).then_some(&account.role)
    }

    /// Whether an account of this name exists (failed logins are tracked per existing account).
    pub(crate) fn has(&self, username: &str) -> bool {
        self.accounts.contains_key(username)
    }

    /// The accounts that have no role (full access), sorted, to warn about once at start.
    pub fn unscoped(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .accounts
            .iter()
            .filter(|(_, a)| a.role == Role::Unscoped)
            .map(|(name, _)| name.as_str())
            .collect();
        names.sort_unstable();
        names
    }

    /// One account, for the start-up probe that proves the listener answers MQTT.
    pub(crate) fn any_login(&self) -> Option<(String, String)> {
        self.accounts
            .iter()
            .min_by_key(|(user, _)| user.as_str())
            .map(|(u, a)| (u.clone(), a.password.clone()))
    }
}

/// Splits `password[:role[:sensors]]`. A trailing field that is no role keeps the old meaning:
/// the whole text is the password.
fn split_role(rest: &str) -> Result<(&str, Role), &'static str> {
    if let Some((head, last)) = rest.rsplit_once(':') {
        let role = match last {
            "admin" => Some(Role::Admin),
            "reader" => Some(Role::Reader),
            "gateway" => Some(Role::Gateway),
            "publisher" => {
                return Err(
                    "role `publisher` needs the sensor ids it may publish: `user:password:publisher:pi-1,pi-2` or `…:publisher:*`",
                );
            }
            _ => None,
        };
        if let Some(role) = role {
            return Ok((head, role));
        }
        if let Some((password, "publisher")) = head.rsplit_once(':') {
            return Ok((password, Role::Publisher(parse_sensors(last)?)));
        }
    }
    Ok((rest, Role::Unscoped))
}

fn parse_sensors(list: &str) -> Result<Sensors, &'static str> {
    if list.trim() == "*" {
        return Ok(Sensors::Any);
    }
    let ids = list
        .split(',')
        .map(|id| SensorId::new(id.trim()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| {
            "a publisher's sensor ids must be DNS labels (a-z, 0-9, -) separated by commas, or `*`"
        })?;
    Ok(Sensors::Only(ids))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut names: Vec<_> = self
            .accounts
            .iter()
            .map(|(name, a)| (name.as_str(), a.role.name()))
            .collect();
        names.sort_unstable();
        f.debug_struct("Users").field("accounts", &names).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn role(users: &Users, user: &str, pw: &str) -> Option<Role> {
        users.authenticate(user, pw).cloned()
    }

    #[test]
    fn parses_accounts_comments_and_blank_lines() {
        let users =
            Users::parse("# k3sense\npublisher:s3cret:with:colons\n\n gateway : pw\r\n").unwrap();
        assert_eq!(users.len(), 2);
        assert_eq!(
            role(&users, "publisher", "s3cret:with:colons"),
            Some(Role::Unscoped)
        );
        assert_eq!(role(&users, "gateway", " pw"), Some(Role::Unscoped));
        assert_eq!(users.unscoped(), ["gateway", "publisher"]);
    }

    #[test]
    fn parses_roles_and_publisher_sensors() {
        let users = Users::parse(
            "a:pw:admin\nr:pw:reader\ng:pw:gateway\np:pw:publisher:pi-1, pi-2\nall:p:w:publisher:*\n",
        )
        .unwrap();
        assert_eq!(role(&users, "a", "pw"), Some(Role::Admin));
        assert_eq!(role(&users, "r", "pw"), Some(Role::Reader));
        assert_eq!(role(&users, "g", "pw"), Some(Role::Gateway));
        let Some(Role::Publisher(sensors)) = role(&users, "p", "pw") else {
            panic!("p is a publisher")
        };
        assert!(sensors.includes("pi-1") && sensors.includes("pi-2") && !sensors.includes("pi-3"));
        assert_eq!(
            role(&users, "all", "p:w"),
            Some(Role::Publisher(Sensors::Any))
        );
        assert!(Sensors::Any.includes("pi-9") && !Sensors::Any.includes("Bad_Id"));
        assert!(users.unscoped().is_empty());
    }

    #[test]
    fn wrong_or_unknown_logins_get_no_role() {
        let users = Users::parse("alice:hunter2:reader").unwrap();
        assert_eq!(role(&users, "alice", "hunter2"), Some(Role::Reader));
        assert_eq!(role(&users, "alice", "hunter2:reader"), None);
        assert_eq!(role(&users, "alice", "hunter"), None);
        assert_eq!(role(&users, "bob", "hunter2"), None);
    }

    #[test]
    fn rejects_bad_lines_with_their_number() {
        assert_eq!(Users::parse("a:b\nnocolon").unwrap_err().0, 2);
        assert_eq!(Users::parse(":pw").unwrap_err(), (1, "empty username"));
        assert_eq!(Users::parse("a:").unwrap_err(), (1, "empty password"));
        assert_eq!(
            Users::parse("a::reader").unwrap_err(),
            (1, "empty password")
        );
        assert_eq!(
            Users::parse("a:1\na:2").unwrap_err(),
            (2, "username listed twice")
        );
        assert!(Users::parse("# only comments\n").is_err());
        assert_eq!(Users::parse("p:pw:publisher").unwrap_err().0, 1);
        assert_eq!(Users::parse("x:y\np:pw:publisher:Pi_1").unwrap_err().0, 2);
        assert_eq!(Users::parse("p:pw:publisher:").unwrap_err().0, 1);
    }

    #[test]
    fn debug_never_shows_passwords() {
        let users = Users::parse("alice:hunter2:reader").unwrap();
        let shown = format!("{users:?}");
        assert!(
            shown.contains("alice") && shown.contains("reader") && !shown.contains("hunter2"),
            "{shown}"
        );
    }
}
