//! Which interfaces the tc programs belong on, followed through netlink link events: pod interfaces
//! appear and vanish all the time, and each must be attached when it appears, not only at start.

use anyhow::{Context as _, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        RouteNetlinkMessage,
        link::{LinkAttribute, LinkMessage},
    },
    sys::{AsyncSocket as _, SocketAddr},
};
use tokio::sync::mpsc;

/// Netlink multicast group of link changes (RTMGRP_LINK).
const RTMGRP_LINK: u32 = 1;

/// A change to the set of interfaces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// An interface exists (it may have been reported before, with another master). `l3`: it has no
    /// Ethernet header (ipip, WireGuard, tun).
    Present { index: u32, name: String, master: u32, l3: bool },
    /// An interface is gone.
    Gone { index: u32, name: String },
}

/// The interface's master (the bridge or bond it is a port of), 0 when none.
fn master_of(msg: &LinkMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Controller(index) => Some(*index),
            _ => None,
        })
        .unwrap_or(0)
}

/// Whether the interface's packets start at the IP header (no Ethernet header).
fn is_l3(msg: &LinkMessage) -> bool {
    msg.header.link_layer_type != rtnetlink::packet_route::link::LinkLayerType::Ether
}

fn name_of(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// Reports every interface present now, then every change, on `tx`, until `tx` is closed.
pub async fn watch(tx: mpsc::Sender<LinkEvent>) -> Result<()> {
    let (mut conn, handle, mut messages) = rtnetlink::new_connection().context("opening a netlink socket")?;
    // Subscribe before the dump so that no interface created in between is missed.
    conn.socket_mut().socket_mut().bind(&SocketAddr::new(0, RTMGRP_LINK)).context("subscribing to link events")?;
    tokio::spawn(conn);
    let mut dump = handle.link().get().execute();
    while let Some(msg) = dump.try_next().await.context("listing interfaces")? {
        if let Some(name) = name_of(&msg) {
            let event = LinkEvent::Present { index: msg.header.index, name, master: master_of(&msg), l3: is_l3(&msg) };
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
    while let Some((msg, _)) = messages.next().await {
        let event = match msg.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(link)) => {
                let (master, l3) = (master_of(&link), is_l3(&link));
                name_of(&link).map(|name| LinkEvent::Present { index: link.header.index, name, master, l3 })
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(link)) => {
                Some(LinkEvent::Gone { index: link.header.index, name: name_of(&link).unwrap_or_default() })
            }
            _ => None,
        };
        if let Some(event) = event
            && tx.send(event).await.is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

/// The interfaces that carry any of `addrs` (loopback excepted): the node's external interfaces when
/// `--interfaces` is not given, found as kube-proxy finds node IPs.
pub async fn interfaces_with(addrs: &[std::net::Ipv4Addr]) -> Result<Vec<String>> {
    use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
    let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    let task = tokio::spawn(conn);
    let mut indexes = std::collections::BTreeSet::new();
    let has_node_ip = |m: &AddressMessage| {
        m.attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(std::net::IpAddr::V4(ip)) if addrs.contains(ip)))
    };
    let mut dump = handle.address().get().execute();
    while let Some(msg) = dump.try_next().await.context("listing addresses")? {
        if has_node_ip(&msg) {
            indexes.insert(msg.header.index);
        }
    }
    let mut names = Vec::new();
    let mut links = handle.link().get().execute();
    while let Some(msg) = links.try_next().await.context("listing interfaces")? {
        if indexes.contains(&msg.header.index)
            && let Some(name) = name_of(&msg)
            && name != "lo"
        {
            names.push(name);
        }
    }
    task.abort();
    Ok(names)
}
