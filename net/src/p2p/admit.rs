//! Admission at accept, before any handshake: a libp2p behaviour that applies the peer
//! port's caps ([`crate::admission`]: per address, in total, new connections per second) to
//! every incoming connection when it is accepted, so a flood of half-finished handshakes from
//! one address holds at most its cap of descriptors. A refused connection is closed at once
//! and counted; an admitted one holds its slot until it closes or fails its handshake.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure, NetworkBehaviour,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};
use parking_lot::Mutex;

use crate::admission::{self, Caps, Slot, Table};
use crate::state::PeerState;

/// The caps incoming connections are admitted under, and the figures they are counted in.
pub struct Admission {
    pub caps: Caps,
    pub state: Arc<PeerState>,
}

/// The behaviour: the admission table and the slot of every admitted connection.
pub struct Admit {
    admission: Admission,
    table: Arc<Mutex<Table>>,
    slots: HashMap<ConnectionId, Slot>,
}

impl Admit {
    pub fn new(admission: Admission) -> Admit {
        Admit {
            admission,
            table: Arc::new(Mutex::new(Table::default())),
            slots: HashMap::new(),
        }
    }
}

/// A refused connection, as the swarm reports it.
#[derive(Debug, thiserror::Error)]
#[error("refused by the peer port's connection caps")]
struct Refused;

impl NetworkBehaviour for Admit {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        // Every listener is TCP or QUIC on an IP: an address without one is not ours to cap.
        let Some(ip) = super::socket_addr(remote).map(|a| a.ip()) else {
            return Ok(());
        };
        let a = &self.admission;
        match admission::admit(&self.table, &a.state.connections, a.caps, ip) {
            Ok(slot) => {
                self.slots.insert(connection_id, slot);
                Ok(())
            }
            // Counted by `admit`.
            Err(_) => Err(ConnectionDenied::new(Refused)),
        }
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. })
            | FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.slots.remove(&connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
