//! Who is at the other end of a connection: a network address, or a client of this process on
//! the local socket (`k3sense all`). Logs name it; the pending pool and the wrong-password
//! slow-down key on its address.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

/// The other end of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peer {
    /// A TCP client (plain or TLS).
    Net(SocketAddr),
    /// A client on the local Unix socket: it runs in this network namespace, as a loopback
    /// client does, and is limited as one.
    Local,
}

impl Peer {
    /// The address limits are kept per: loopback for the local socket.
    pub(crate) fn ip(self) -> IpAddr {
        match self {
            Self::Net(addr) => addr.ip(),
            Self::Local => IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Net(addr) => addr.fmt(f),
            Self::Local => f.write_str("local socket"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_client_is_named_and_limited_as_loopback() {
        assert_eq!(Peer::Local.to_string(), "local socket");
        assert_eq!(Peer::Local.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
        let addr: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        assert_eq!(Peer::Net(addr).to_string(), "192.0.2.7:40000");
        assert_eq!(Peer::Net(addr).ip(), addr.ip());
    }
}
