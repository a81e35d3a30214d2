//! Bounds on subscriptions: per connection, and on the filters rumqttd ever holds.
//!
//! rumqttd 0.20 gives every distinct filter it is asked for a log of its own (its router's
//! `DataLog`: a commit log, waiters, a meter) and never removes one, not on UNSUBSCRIBE and not
//! when the last subscriber leaves (its `router/logs.rs` has no removal, and no API reaches it).
//! Measured through the proxy before this module (issue 14): 15,000 distinct filters from one
//! reader grew the broker from 113 to 199 MB (~5.6 KiB per filter; 6.5 KiB measured here in a
//! debug build), for good. So a filter rumqttd already knows costs nothing more, and a *new* one is a
//! permanent cost that must be budgeted:
//!
//! - [`FilterTable`]: every filter ever forwarded to rumqttd. A new one is admitted while the
//!   table holds fewer than `--max-filters` and its account has added fewer than
//!   `--max-filters-per-account`; otherwise the filter is refused with SUBACK 0x80. Filters
//!   already in the table (the gateway's `k3sense/+/state`, a publisher's replay filter) stay
//!   open to everyone, so one account spending its budget locks out nobody else's usual filters.
//! - [`Subscriptions`]: the filters one connection holds; more than `--max-subscriptions` at
//!   once are refused with 0x80. It goes with the connection.
//!
//! What stays in rumqttd after a clean session ends is then bounded by the table: at most
//! `--max-filters` logs, whatever clients do.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

/// Why a filter was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The connection holds `--max-subscriptions` filters.
    Connection,
    /// The account has added `--max-filters-per-account` new filters to rumqttd's table.
    Account,
    /// rumqttd's table holds `--max-filters` filters.
    Table,
}

impl Refused {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Connection => "--max-subscriptions on this connection",
            Self::Account => "--max-filters-per-account new filters added by this account",
            Self::Table => "--max-filters distinct filters held by the broker",
        }
    }
}

/// Every filter forwarded to rumqttd, and how many each account added.
#[derive(Debug)]
pub(crate) struct FilterTable {
    inner: Mutex<Table>,
    max_total: usize,
    max_per_account: usize,
}

#[derive(Debug, Default)]
struct Table {
    known: HashSet<String>,
    added_by: HashMap<String, usize>,
}

impl FilterTable {
    pub(crate) fn new(max_total: usize, max_per_account: usize) -> Self {
        Self {
            inner: Mutex::new(Table::default()),
            max_total,
            max_per_account,
        }
    }

    /// Whether `account` may have `filter` forwarded: a known filter always, a new one within
    /// the budgets (and it is then known for good, as it is in rumqttd).
    pub(crate) fn admit(&self, account: &str, filter: &str) -> Result<(), Refused> {
        let Ok(mut table) = self.inner.lock() else {
            return Err(Refused::Table);
        };
        if table.known.contains(filter) {
            return Ok(());
        }
        if table.known.len() >= self.max_total {
            return Err(Refused::Table);
        }
        let added = table.added_by.get(account).copied().unwrap_or(0);
        if added >= self.max_per_account {
            return Err(Refused::Account);
        }
        table.known.insert(filter.to_owned());
        table.added_by.insert(account.to_owned(), added + 1);
        Ok(())
    }

    /// Distinct filters forwarded to rumqttd so far.
    pub(crate) fn len(&self) -> usize {
        self.inner.lock().map_or(0, |t| t.known.len())
    }
}

/// The filters one connection is subscribed to.
#[derive(Debug)]
pub(crate) struct Subscriptions {
    active: HashSet<String>,
    max: usize,
}

impl Subscriptions {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            active: HashSet::new(),
            max,
        }
    }

    /// Admits `filter` for this connection: one it already holds always (a re-subscribe), a new
    /// one while it holds fewer than the maximum and the table admits it.
    pub(crate) fn admit(
        &mut self,
        table: &FilterTable,
        account: &str,
        filter: &str,
    ) -> Result<(), Refused> {
        if self.active.contains(filter) {
            return Ok(());
        }
        if self.active.len() >= self.max {
            return Err(Refused::Connection);
        }
        table.admit(account, filter)?;
        self.active.insert(filter.to_owned());
        Ok(())
    }

    /// Admits `filter`, served by the front itself (`$SYS`): within the connection's maximum,
    /// without a place in rumqttd's table.
    pub(crate) fn admit_local(&mut self, filter: &str) -> Result<(), Refused> {
        if self.active.contains(filter) {
            return Ok(());
        }
        if self.active.len() >= self.max {
            return Err(Refused::Connection);
        }
        self.active.insert(filter.to_owned());
        Ok(())
    }

    /// The client unsubscribed from `filter`.
    pub(crate) fn remove(&mut self, filter: &str) {
        self.active.remove(filter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_filters_are_free_and_new_ones_are_budgeted_per_account_and_in_total() {
        let table = FilterTable::new(4, 2);
        assert_eq!(table.admit("reader", "k3sense/a/#"), Ok(()));
        assert_eq!(table.admit("reader", "k3sense/b/#"), Ok(()));
        assert_eq!(table.admit("reader", "k3sense/c/#"), Err(Refused::Account));
        // Known filters stay open, to the same account and to others.
        assert_eq!(table.admit("reader", "k3sense/a/#"), Ok(()));
        assert_eq!(table.admit("gateway", "k3sense/b/#"), Ok(()));
        assert_eq!(table.admit("gateway", "k3sense/+/state"), Ok(()));
        assert_eq!(table.admit("admin", "x"), Ok(()));
        assert_eq!(table.admit("admin", "y"), Err(Refused::Table));
        assert_eq!(table.admit("other", "z"), Err(Refused::Table));
        assert_eq!(table.admit("other", "x"), Ok(()));
        assert_eq!(table.len(), 4);
    }

    #[test]
    fn a_connection_holds_at_most_its_maximum_and_unsubscribing_frees_room() {
        let table = FilterTable::new(100, 100);
        let mut subs = Subscriptions::new(2);
        assert_eq!(subs.admit(&table, "r", "a"), Ok(()));
        assert_eq!(subs.admit(&table, "r", "b"), Ok(()));
        assert_eq!(subs.admit(&table, "r", "a"), Ok(()), "a re-subscribe");
        assert_eq!(subs.admit(&table, "r", "c"), Err(Refused::Connection));
        subs.remove("a");
        assert_eq!(subs.admit(&table, "r", "c"), Ok(()));
        // A refusal by the table leaves the connection's room unused.
        let full = FilterTable::new(0, 100);
        let mut subs = Subscriptions::new(1);
        assert_eq!(subs.admit(&full, "r", "a"), Err(Refused::Table));
        assert_eq!(subs.admit(&table, "r", "a"), Ok(()));
    }
}
