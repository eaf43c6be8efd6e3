//! A small synchronous rtnetlink client for the pod's network: find a NIC by MAC,
//! rename it, set its MTU, add addresses, bring it up, add routes. Blocking: it runs
//! on the thread that entered the pod's network namespace (a netlink socket works in
//! the namespace it was opened in).

use std::net::IpAddr;

use netlink_packet_core::{
    NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::Socket;

use super::validate::{Family, RouteConfig};

/// Largest datagram read at once (a link dump of a few NICs fits many times).
const RECV_BUFFER: usize = 64 << 10;

/// What went wrong talking to the kernel.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket")]
    Socket(#[source] std::io::Error),
    #[error("the kernel refused to {what}")]
    Refused {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the kernel's netlink reply: {0}")]
    Decode(String),
    #[error("no interface has MAC {0}")]
    NoSuchMac(String),
}

/// One link as the kernel lists it.
#[derive(Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<Vec<u8>>,
}

/// An open NETLINK_ROUTE socket.
pub struct Netlink {
    socket: Socket,
    sequence: u32,
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> Result<Netlink, NetlinkError> {
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(NetlinkError::Socket)?;
        socket.bind_auto().map_err(NetlinkError::Socket)?;
        Ok(Netlink {
            socket,
            sequence: 0,
        })
    }

    fn send(&mut self, message: RouteNetlinkMessage, flags: u16) -> Result<u32, NetlinkError> {
        let mut req = NetlinkMessage::from(message);
        self.sequence = self.sequence.wrapping_add(1);
        req.header.flags = flags;
        req.header.sequence_number = self.sequence;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(NetlinkError::Socket)?;
        Ok(self.sequence)
    }

    /// Reads replies to `sequence` until its ACK/error (or the dump's end), handing
    /// every data message to `each`.
    fn receive(
        &mut self,
        sequence: u32,
        what: &str,
        mut each: impl FnMut(RouteNetlinkMessage),
    ) -> Result<(), NetlinkError> {
        let mut buf = vec![0u8; RECV_BUFFER];
        loop {
            let n = self
                .socket
                .recv(&mut &mut buf[..], 0)
                .map_err(NetlinkError::Socket)?;
            let mut offset = 0;
            while offset < n {
                let message = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                    .map_err(|e| NetlinkError::Decode(e.to_string()))?;
                let length = message.header.length as usize;
                let ours = message.header.sequence_number == sequence;
                match message.payload {
                    NetlinkPayload::Error(e) if ours => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(NetlinkError::Refused {
                                what: what.to_owned(),
                                source: std::io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::Done(_) if ours => return Ok(()),
                    NetlinkPayload::InnerMessage(inner) if ours => each(inner),
                    _ => {}
                }
                if length == 0 {
                    break;
                }
                offset += length;
            }
        }
    }

    /// Sends `message` and waits for the kernel's acknowledgement.
    fn request(
        &mut self,
        message: RouteNetlinkMessage,
        extra_flags: u16,
        what: &str,
    ) -> Result<(), NetlinkError> {
        let seq = self.send(message, NLM_F_REQUEST | NLM_F_ACK | extra_flags)?;
        self.receive(seq, what, |_| {})
    }

    /// Every link of the namespace.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let seq = self.send(
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        )?;
        let mut links = Vec::new();
        self.receive(seq, "list the network interfaces", |m| {
            if let RouteNetlinkMessage::NewLink(link) = m {
                let mut entry = Link {
                    index: link.header.index,
                    name: String::new(),
                    mac: None,
                };
                for attr in link.attributes {
                    match attr {
                        LinkAttribute::IfName(name) => entry.name = name,
                        LinkAttribute::Address(mac) => entry.mac = Some(mac),
                        _ => {}
                    }
                }
                links.push(entry);
            }
        })?;
        Ok(links)
    }

    /// The index of the link named `name`.
    pub fn index_of(&mut self, name: &str) -> Result<Option<u32>, NetlinkError> {
        Ok(self
            .links()?
            .into_iter()
            .find(|l| l.name == name)
            .map(|l| l.index))
    }

    /// The link whose hardware address is `mac`.
    pub fn find_by_mac(&mut self, mac: &[u8; 6]) -> Result<Link, NetlinkError> {
        self.links()?
            .into_iter()
            .find(|l| l.mac.as_deref() == Some(&mac[..]))
            .ok_or_else(|| NetlinkError::NoSuchMac(format_mac(mac)))
    }

    fn set_flags(&mut self, index: u32, up: bool, what: &str) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.header.change_mask = LinkFlags::Up;
        if up {
            link.header.flags = LinkFlags::Up;
        }
        self.request(RouteNetlinkMessage::SetLink(link), 0, what)
    }

    /// Brings the link up.
    pub fn set_up(&mut self, index: u32, name: &str) -> Result<(), NetlinkError> {
        self.set_flags(index, true, &format!("bring {name} up"))
    }

    /// Renames the link (down first: the kernel refuses to rename a running link).
    pub fn rename(&mut self, index: u32, from: &str, to: &str) -> Result<(), NetlinkError> {
        if from == to {
            return Ok(());
        }
        self.set_flags(index, false, &format!("bring {from} down to rename it"))?;
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::IfName(to.to_owned()));
        self.request(
            RouteNetlinkMessage::SetLink(link),
            0,
            &format!("rename {from} to {to}"),
        )
    }

    /// Sets the link's MTU.
    pub fn set_mtu(&mut self, index: u32, name: &str, mtu: u32) -> Result<(), NetlinkError> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes.push(LinkAttribute::Mtu(mtu));
        self.request(
            RouteNetlinkMessage::SetLink(link),
            0,
            &format!("set the MTU of {name} to {mtu}"),
        )
    }

    /// Adds `address/prefix` to the link.
    pub fn add_address(
        &mut self,
        index: u32,
        name: &str,
        address: IpAddr,
        prefix: u8,
    ) -> Result<(), NetlinkError> {
        let mut message = AddressMessage::default();
        message.header.index = index;
        message.header.prefix_len = prefix;
        message.header.family = match address {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        message.attributes.push(AddressAttribute::Local(address));
        message.attributes.push(AddressAttribute::Address(address));
        if let IpAddr::V4(v4) = address {
            if prefix < 31 {
                let host_bits = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
                let broadcast = std::net::Ipv4Addr::from(u32::from(v4) | host_bits);
                message
                    .attributes
                    .push(AddressAttribute::Broadcast(broadcast));
            }
        }
        self.request(
            RouteNetlinkMessage::NewAddress(message),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add {address}/{prefix} to {name}"),
        )
    }

    /// Adds `route` in the main table; `oif` is its device's index.
    pub fn add_route(&mut self, route: &RouteConfig, oif: Option<u32>) -> Result<(), NetlinkError> {
        let mut message = RouteMessage::default();
        message.header.address_family = match route.family {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        };
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.kind = RouteType::Unicast;
        // Without a gateway the destination is on the link itself.
        message.header.scope = if route.gateway.is_some() {
            RouteScope::Universe
        } else {
            RouteScope::Link
        };
        if let Some((ip, prefix)) = route.destination {
            message.header.destination_prefix_length = prefix;
            message
                .attributes
                .push(RouteAttribute::Destination(RouteAddress::from(ip)));
        }
        if let Some(gw) = route.gateway {
            message
                .attributes
                .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
        }
        if let Some(src) = route.source {
            message
                .attributes
                .push(RouteAttribute::PrefSource(RouteAddress::from(src)));
        }
        if let Some(index) = oif {
            message.attributes.push(RouteAttribute::Oif(index));
        }
        if route.metric != 0 {
            message
                .attributes
                .push(RouteAttribute::Priority(route.metric));
        }
        self.request(
            RouteNetlinkMessage::NewRoute(message),
            NLM_F_CREATE | NLM_F_EXCL,
            &format!("add the route {}", describe_route(route)),
        )
    }
}

/// "aa:bb:cc:dd:ee:ff".
pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A route as `ip route` would print it, for errors and logs.
pub fn describe_route(route: &RouteConfig) -> String {
    let mut text = match route.destination {
        Some((ip, prefix)) => format!("{ip}/{prefix}"),
        None => "default".to_owned(),
    };
    if let Some(gw) = route.gateway {
        text.push_str(&format!(" via {gw}"));
    }
    if let Some(dev) = &route.device {
        text.push_str(&format!(" dev {dev}"));
    }
    if let Some(src) = route.source {
        text.push_str(&format!(" src {src}"));
    }
    if route.metric != 0 {
        text.push_str(&format!(" metric {}", route.metric));
    }
    text
}
